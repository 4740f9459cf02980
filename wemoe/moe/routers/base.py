"""Router kinds: how a routed group turns its input tokens (B, N, D) into one coefficient vector per sample (B, T).

A kind is registered in :data:`ROUTERS` (picked with ``--router``), with typed
options that become flags. It builds the router module of every routed group,
checks its options against the architecture and the adaptation data before any
compute, and, for training-free kinds, fits the routers from the built model (and
data) before any adaptation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from wemoe.core.arch import ViTArch
from wemoe.core.registry import Kind, Registry


@dataclass(frozen=True)
class RouterCheck:
    """What a router kind may check its options against before any compute."""

    arch: ViTArch
    task_names: Sequence[str]
    data_sizes: Mapping[str, int] = field(default_factory=dict)  # images per task the adaptation data holds


class RouterKind(Kind):
    """A router kind with its options.

    ``fitted``: :meth:`fit` sets the routers from the built model (and data) before any
    adaptation (which may then train them further). ``shared``: one router computed once
    per image drives every routed group (:meth:`build_shared`), instead of one router
    per group reading that group's input (:meth:`build`). ``trainable``: it has
    parameters that ``--steps`` of adaptation train. ``layers``: the learned
    routers' depth, as records of format 1 name them.
    """

    fitted: ClassVar[bool] = False
    shared: ClassVar[bool] = False
    trainable: ClassVar[bool] = True  # has parameters adaptation can train
    layers: ClassVar[int | None] = None

    def check(self, ctx: RouterCheck) -> None:
        """Refuse options that do not fit, with one line."""

    def build(self, width: int, num_experts: int, init_lambda: float) -> nn.Module:
        """One group's router; built on the meta device, then given real values by its ``materialize(device)``."""
        raise NotImplementedError

    def build_shared(self, arch: ViTArch, num_experts: int, init_lambda: float) -> nn.Module:
        """Shared kinds: the one router, mapping ``model.router_features(images)`` to (B, T) coefficients."""
        raise NotImplementedError

    def fit(self, model: Any, data: Mapping[str, Any], seed: int, device: str) -> dict[str, Any] | None:
        """Fitted kinds: set every router of ``model`` (a ``WEMoEModel``) before adaptation; what to record of it, if anything."""

    def describe(self) -> str:
        options = ", ".join(f"{k} {v}" for k, v in self.record().items())
        return f"{self.name}" + (f" ({options})" if options else "")


ROUTERS: Registry[RouterKind] = Registry("router", "--router", RouterKind)


def keep_top_k(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest weights of each row, renormalised (k <= 0 or >= T: all)."""
    if k <= 0 or k >= weights.shape[-1]:
        return weights
    kept = weights.topk(k, dim=-1).indices
    mask = torch.zeros_like(weights).scatter_(-1, kept, 1.0)
    masked = weights * mask
    return masked / masked.sum(-1, keepdim=True)


__all__ = ["ROUTERS", "RouterCheck", "RouterKind", "keep_top_k"]
