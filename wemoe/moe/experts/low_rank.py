"""Low-rank experts: each weight task vector kept as its rank-R truncated SVD; no per-sample weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from wemoe.core.params import param
from wemoe.errors import WemoeError
from wemoe.moe.experts.base import EXPERT_STORES, ExpertStore, ExpertStoreKind, TaskVectors
from wemoe.moe.experts.rank import RANK_HELP, parse_rank


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
        dtype = self.down.dtype
        xc = x.to(dtype)
        c = coefs.to(dtype)
        B, N = x.shape[:2]
        T, R = self.num_experts, self.rank
        h = F.linear(xc, self.down.reshape(T * R, self.in_features)).view(B, N, T, R) * c[:, None, :, None]
        # the expert biases ride along as T more columns (each token carries its sample's coefficients), so the
        # whole correction is one addmm into the base output: no (B, N, out) temporaries, one pass over y
        h = torch.cat([h.reshape(B * N, T * R), c.repeat_interleave(N, dim=0)], dim=1)  # (B*N, T*R + T)
        up = torch.cat([self.up.reshape(T * R, self.out_features), self.bias], dim=0)  # (T*R + T, out)
        y = F.linear(xc, weight, bias)
        return y.view(B * N, self.out_features).addmm_(h, up).view(B, N, self.out_features)

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.bmm(self.up.transpose(1, 2), self.down), self.bias

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, rank={self.rank}"


def truncated_svd(dw: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``down`` (R, in), ``up`` (R, out) with ``up^T @ down`` the best rank-R approximation of ``dw`` (out, in),
    and the fraction of ``dw``'s energy (squared Frobenius norm) they keep."""
    u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    total = float((s * s).sum())
    kept = float((s[:rank] * s[:rank]).sum())
    up = (u[:, :rank] * s[:rank]).t()
    return vh[:rank].to(dw.dtype).contiguous(), up.to(dw.dtype).contiguous(), (kept / total if total > 0 else 1.0)


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
        return LowRankExperts(num_experts, in_features, out_features, self.rank, device=device)

    def weight_buffers(self, vectors: TaskVectors, out_features: int, in_features: int) -> tuple[dict[str, torch.Tensor], Any]:
        """Each task vector's rank-R truncated SVD; a LoRA adapter's own factors where their rank is at most R
        (exact, no SVD: zero rows pad them to R)."""
        downs, ups, kept = [], [], []
        given = getattr(vectors, "factors", lambda: None)() or []
        for t, tau in enumerate(vectors):
            own = given[t] if t < len(given) else None
            if own is not None and own[0].shape[0] <= self.rank:
                down, up, fraction = *padded(own, self.rank), 1.0
            else:
                down, up, fraction = truncated_svd(tau.float(), self.rank)
            downs.append(down)
            ups.append(up)
            kept.append(round(fraction, 6))
        return {"down": torch.stack(downs), "up": torch.stack(ups)}, kept

    def describe(self) -> str:
        return f"rank {self.rank}"

    def record(self) -> dict[str, Any]:
        return {"rank": self.rank}


__all__ = ["LowRank", "LowRankExperts", "padded", "truncated_svd"]
