"""Expert stores: the task vectors of one routed linear layer, and how they are applied per sample.

A store holds, for T tasks, the change fine-tuning made to one linear layer
(dW_t, db_t) and answers three questions behind one small interface:

* ``apply(x, coefs, weight, bias)``: ``x_b @ (W0 + sum_t c_bt dW_t)^T + b0 + sum_t c_bt db_t``
  for every sample b, given the layer's pretrained ``weight``/``bias``;
* ``delta(coefs)``: ``sum_t c_t dW_t`` and ``sum_t c_t db_t`` for one fixed coefficient vector
  (export, fixed routing);
* its buffers (the state that is saved).

An :class:`ExpertStoreKind` (registered in :data:`EXPERT_STORES`, picked with
``--expert-store``) says how a merge fills a store from the task vectors and what
of it the record keeps. Built in: ``dense`` (the paper's: every task vector whole),
``low-rank`` (rank-R truncated SVD factors) and ``sign-mask`` (the largest entries' signs
under one scale, with a bit mask).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from wemoe.core.arch import ViTArch
from wemoe.core.registry import Kind, Registry


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ExpertStore(nn.Module):
    """The task vectors of one routed linear layer."""

    num_experts: int
    in_features: int
    out_features: int

    def apply(self, x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, out, in) weight and (T, out) bias task vectors as this store represents them."""
        raise NotImplementedError

    @torch.no_grad()
    def delta(self, coefs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_t c_t dW_t`` (out, in) and ``sum_t c_t db_t`` (out,), merged in float32 or better."""
        dw, db = self.task_vectors()
        work = work_dtype(dw.dtype)
        c = coefs.to(device=dw.device, dtype=work).reshape(-1)
        return (c @ dw.reshape(self.num_experts, -1).to(work)).view(self.out_features, self.in_features), c @ db.to(work)


class TaskVectors(Protocol):
    """The task vectors of one weight matrix (out, in), float32, as a merge offers them."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        """tau_t one task at a time."""
        ...

    def stack(self, transposed: bool = False) -> torch.Tensor:
        """All of them as one (T, out, in) tensor; ``transposed``: stored as (T, in, out), returned as its (T, out, in) view."""
        ...

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per task, factors its vector is given in exactly (a LoRA adapter's): ``down`` (r, in) and ``up`` (r, out)
        with ``up^T @ down`` = tau_t; None for a task given as a whole checkpoint."""
        ...


class ExpertStoreKind(Kind):
    """How routed linears keep their task vectors: a registered kind with its options."""

    def check(self, arch: ViTArch) -> None:
        """Refuse options that do not fit the architecture, before any compute."""

    def build(self, num_experts: int, in_features: int, out_features: int, device: torch.device | str | None = None) -> ExpertStore:
        """An empty store (its buffers are assigned from :meth:`weight_buffers` or a saved state)."""
        raise NotImplementedError

    def weight_buffers(self, vectors: TaskVectors, out_features: int, in_features: int) -> tuple[dict[str, torch.Tensor], Any]:
        """The store's weight buffers (by buffer name) from the task vectors, and what the record keeps of them (or None).

        The bias task vectors are always kept whole, as the store's ``bias`` buffer.
        """
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def record(self) -> dict[str, Any]:
        """The ``rank`` field of the record (None: dense), plus ``expert_store`` for kinds other than the built-in two."""
        return {"rank": None, "expert_store": {"kind": self.name, "options": super().record()}}


def _auto_store(params: Any) -> str:
    """``--expert-store auto``: whole task vectors for ``--expert-rank full``, rank-R factors otherwise."""
    return "dense" if str(getattr(params, "expert_rank", "full")).strip().lower() == "full" else "low-rank"


EXPERT_STORES: Registry[ExpertStoreKind] = Registry("expert store", "--expert-store", ExpertStoreKind, auto=_auto_store)


def store_from_record(moe: dict[str, Any]) -> ExpertStoreKind:
    """The store a record describes: ``expert_store`` when present, else ``rank`` (None: dense, R: low-rank)."""
    stored = moe.get("expert_store")
    if isinstance(stored, dict):
        return EXPERT_STORES.from_record(str(stored.get("kind")), stored.get("options"))
    rank = moe.get("rank")
    if rank is None:
        return EXPERT_STORES.from_record("dense", None)
    return EXPERT_STORES.from_record("low-rank", {"rank": str(rank), "dtype": moe.get("expert_dtype")})


__all__ = ["EXPERT_STORES", "ExpertStore", "ExpertStoreKind", "TaskVectors", "store_from_record", "work_dtype"]
