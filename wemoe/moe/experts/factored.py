"""The per-sample product of low-rank experts, shared by every store that keeps rank-R factors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def low_rank_apply(
    x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, down: torch.Tensor, up: torch.Tensor, expert_bias: torch.Tensor
) -> torch.Tensor:
    """``x @ (W0 + sum_t c_t up_t^T down_t)^T + b0 + sum_t c_t db_t`` per sample, with factors ``down`` (T, R, in),
    ``up`` (T, R, out) and ``expert_bias`` (T, out): two multiplies, no per-sample weights."""
    dtype = down.dtype
    xc = x.to(dtype)
    c = coefs.to(dtype)
    B, N = x.shape[:2]
    T, R, in_features = down.shape
    out_features = up.shape[-1]
    h = F.linear(xc, down.reshape(T * R, in_features)).view(B, N, T, R) * c[:, None, :, None]
    # the expert biases ride along as T more columns (each token carries its sample's coefficients), so the
    # whole correction is one addmm into the base output: no (B, N, out) temporaries, one pass over y
    h = torch.cat([h.reshape(B * N, T * R), c.repeat_interleave(N, dim=0)], dim=1)  # (B*N, T*R + T)
    factors = torch.cat([up.reshape(T * R, out_features), expert_bias.to(dtype)], dim=0)  # (T*R + T, out)
    y = F.linear(xc, weight, bias)
    return y.view(B * N, out_features).addmm_(h, factors).view(B, N, out_features)


__all__ = ["low_rank_apply"]
