"""Low-rank experts stored in 8 bits (``--expert-dtype int8``): a quarter of the float32 factors' bytes.

Each row of ``down`` (a right singular vector) and of ``up`` (a scaled left one) is kept as
int8 with one float32 scale (symmetric, absmax / 127): rows differ in magnitude by the
singular values, so one scale per row keeps every row's relative error near 1/254. The
factors are turned back into floats when a forward needs them (a T x R x (in + out)
tensor per layer, small next to the layer's own multiply).
"""

from __future__ import annotations

import torch

from wemoe.moe.experts.base import ExpertStore
from wemoe.moe.experts.factored import low_rank_apply

EXPERT_DTYPES = ("float32", "int8")
EXPERT_DTYPE_HELP = "how --expert-rank factors are stored: float32, or int8 with one float32 scale per factor row (a quarter of the bytes)"


def quantize_rows(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and a float32 scale per row (last dimension): ``factors ~= values * scale``."""
    f = factors.float()
    scale = f.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(f / safe).clamp_(-127, 127).to(torch.int8), scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.to(scale.dtype) * scale


class Int8LowRankExperts(ExpertStore):
    """Rank-R factors as int8 rows with float32 scales: ``down_q`` (T, R, in), ``up_q`` (T, R, out), ``*_scale`` (T, R, 1)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.in_features, self.out_features, self.rank = int(num_experts), int(in_features), int(out_features), int(rank)
        self.register_buffer("down_q", torch.empty(num_experts, rank, in_features, dtype=torch.int8, device=device))
        self.register_buffer("down_scale", torch.empty(num_experts, rank, 1, device=device))
        self.register_buffer("up_q", torch.empty(num_experts, rank, out_features, dtype=torch.int8, device=device))
        self.register_buffer("up_scale", torch.empty(num_experts, rank, 1, device=device))
        self.register_buffer("bias", torch.empty(num_experts, out_features, device=device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``down`` and ``up`` as floats (the scales' dtype)."""
        return dequantize_rows(self.down_q, self.down_scale), dequantize_rows(self.up_q, self.up_scale)

    def apply(self, x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        down, up = self.factors()
        return low_rank_apply(x, coefs, weight, bias, down, up, self.bias)

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        down, up = self.factors()
        return torch.bmm(up.transpose(1, 2), down), self.bias

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, rank={self.rank}, int8"


__all__ = ["EXPERT_DTYPES", "EXPERT_DTYPE_HELP", "Int8LowRankExperts", "dequantize_rows", "quantize_rows"]
