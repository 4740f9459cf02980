"""Low-rank experts: each weight task vector kept as its rank-R truncated SVD; no per-sample weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from wemoe.core.params import param
from wemoe.errors import WemoeError
from wemoe.moe.experts.base import EXPERT_STORES, ExpertStore, ExpertStoreKind, TaskVectors
from wemoe.moe.experts.factored import low_rank_apply
from wemoe.moe.experts.int8 import EXPERT_DTYPE_HELP, EXPERT_DTYPES, Int8LowRankExperts, quantize_rows
from wemoe.moe.experts.rank import RANK_HELP, parse_rank
from wemoe.moe.experts.svd import SVD_HELP, SVD_METHODS, randomized_truncated_svd, truncated_svd


class LowRankExperts(ExpertStore):
    """Rank-R task vectors: ``dW_t ~= up_t^T @ down_t`` with ``down`` (T, R, in), ``up`` (T, R, out).

    ``down_t`` are the top-R right singular vectors of dW_t, ``up_t`` the left ones
    scaled by the singular values; ``bias`` (T, out) is kept whole.
    """

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, rank: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise WemoeError(f"expert rank must be between 1 and {min(in_features, out_features)} for a {out_features}x{in_features} matrix, got {rank}")
        self.num_experts, self.in_features, self.out_features, self.rank = int(num_experts), int(in_features), int(out_features), int(rank)
        self.register_buffer("down", torch.empty(num_experts, rank, in_features, dtype=dtype, device=device))
        self.register_buffer("up", torch.empty(num_experts, rank, out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(num_experts, out_features, dtype=dtype, device=device))

    def apply(self, x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return low_rank_apply(x, coefs, weight, bias, self.down, self.up, self.bias)

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.bmm(self.up.transpose(1, 2), self.down), self.bias

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, rank={self.rank}"


def padded(factors: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of rank r <= ``rank`` as rank-``rank`` ones: zero rows add nothing to ``up^T @ down``."""
    down, up = (f.float() for f in factors)
    extra = rank - down.shape[0]
    return F.pad(down, (0, 0, 0, extra)).contiguous(), F.pad(up, (0, 0, 0, extra)).contiguous()


@EXPERT_STORES.register
class LowRank(ExpertStoreKind):
    name = "low-rank"
    summary = "rank-R truncated SVD factors of every task vector (--expert-rank R)"

    @dataclass(frozen=True)
    class Options:
        rank: str = param("full", RANK_HELP, key="expert_rank", check=parse_rank)
        svd: str = param("exact", SVD_HELP, key="expert_svd", choices=SVD_METHODS)
        dtype: str = param("float32", EXPERT_DTYPE_HELP, key="expert_dtype", choices=EXPERT_DTYPES)

    @property
    def rank(self) -> int:
        rank = parse_rank(self.options.rank)
        if rank is None:
            raise WemoeError("--expert-store low-rank needs --expert-rank R (a positive integer)")
        return rank

    def check(self, arch) -> None:
        smallest = min(arch.width, arch.mlp_width)  # every routed matrix is width x width or larger
        if self.rank > smallest:
            raise WemoeError(f"--expert-rank {self.rank} is above the smaller side ({smallest}) of the routed matrices")

    def build(self, num_experts: int, in_features: int, out_features: int, device: torch.device | str | None = None) -> ExpertStore:
        if self.options.dtype == "int8":
            return Int8LowRankExperts(num_experts, in_features, out_features, self.rank, device=device)
        return LowRankExperts(num_experts, in_features, out_features, self.rank, device=device)

    def weight_buffers(self, vectors: TaskVectors, out_features: int, in_features: int) -> tuple[dict[str, torch.Tensor], Any]:
        """Each task vector's rank-R truncated SVD (exact, or randomized over the layer's tasks at once); a LoRA
        adapter's own factors where their rank is at most R (exact, no SVD: zero rows pad them to R); with
        ``--expert-dtype int8`` the factors are then stored in 8 bits (the energy recorded is the SVD's)."""
        buffers, kept = self._factors(vectors)
        if self.options.dtype != "int8":
            return buffers, kept
        down_q, down_scale = quantize_rows(buffers["down"])
        up_q, up_scale = quantize_rows(buffers["up"])
        return {"down_q": down_q, "down_scale": down_scale, "up_q": up_q, "up_scale": up_scale}, kept

    def _factors(self, vectors: TaskVectors) -> tuple[dict[str, torch.Tensor], list[float]]:
        given = getattr(vectors, "factors", lambda: None)() or []
        own = [f if f is not None and f[0].shape[0] <= self.rank else None for f in given]  # per task, or empty
        if self.options.svd == "randomized" and all(f is None for f in own):
            down, up, kept = randomized_truncated_svd(vectors.stack(), self.rank)
            return {"down": down, "up": up}, [round(f, 6) for f in kept]
        downs, ups, kept = [], [], []
        for t, tau in enumerate(vectors):
            mine = own[t] if t < len(own) else None
            if mine is not None:
                down, up, fraction = *padded(mine, self.rank), 1.0
            elif self.options.svd == "randomized":
                d, u, f = randomized_truncated_svd(tau.float()[None], self.rank)
                down, up, fraction = d[0], u[0], f[0]
            else:
                down, up, fraction = truncated_svd(tau.float(), self.rank)
            downs.append(down)
            ups.append(up)
            kept.append(round(fraction, 6))
        return {"down": torch.stack(downs), "up": torch.stack(ups)}, kept

    def describe(self) -> str:
        return f"rank {self.rank}" + (", randomized SVD" if self.options.svd == "randomized" else "") + (", int8" if self.options.dtype == "int8" else "")

    def record(self) -> dict[str, Any]:
        """``rank``; ``expert_svd`` and ``expert_dtype`` only where they are not the defaults (a loader needs the dtype)."""
        extra = {"expert_svd": self.options.svd} if self.options.svd != "exact" else {}
        return {"rank": self.rank, **extra, **({"expert_dtype": self.options.dtype} if self.options.dtype != "float32" else {})}


__all__ = ["LowRank", "LowRankExperts", "padded", "truncated_svd"]
