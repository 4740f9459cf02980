"""A routed linear layer: the pretrained weight plus an expert store, merged per sample.

An attention projection or an MLP linear becomes routed by building it with
:func:`routed_linear_factory` instead of ``Linear``; nothing else of the block
changes. The base is always the PRETRAINED weight and bias (not the merged one),
the experts the task vectors, as in the WEMoE paper.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from wemoe.errors import WemoeError
from wemoe.moe.experts import ExpertStore, ExpertStoreKind


class RoutedLinear(nn.Module):
    """``y_b = x_b (W0 + sum_t c_bt dW_t)^T + (b0 + sum_t c_bt db_t)`` for every sample b.

    Buffers: ``weight`` (out, in) and ``bias`` (out,) pretrained; ``experts.*`` the task vectors.
    """

    def __init__(self, in_features: int, out_features: int, experts: ExpertStore, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("weight", torch.empty(out_features, in_features, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device))
        self.experts = experts

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: torch.Tensor, coefs: torch.Tensor | None = None) -> torch.Tensor:
        if coefs is None:  # the pretrained layer (the pass a shared router reads)
            return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        return self.experts.apply(x, coefs, self.weight, self.bias).to(x.dtype)

    @torch.no_grad()
    def merged(self, coefs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain ``(weight, bias)`` for one coefficient vector (T,): W0 + sum_t c_t dW_t, merged in float32."""
        coefs = torch.as_tensor(coefs).reshape(-1)
        if coefs.numel() != self.num_experts:
            raise WemoeError(f"merging needs {self.num_experts} coefficients, got {coefs.numel()}")
        dw, db = self.experts.delta(coefs)
        return (self.weight.to(dw.dtype) + dw).to(self.weight.dtype).contiguous(), (self.bias.to(db.dtype) + db).to(self.bias.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def routed_linear_factory(num_experts: int, store: ExpertStoreKind, device: torch.device | str | None = None) -> Callable[[int, int], RoutedLinear]:
    """Factory of routed linears whose task vectors ``store`` keeps."""

    def make(in_features: int, out_features: int) -> RoutedLinear:
        return RoutedLinear(in_features, out_features, store.build(num_experts, in_features, out_features, device=device), device=device)

    return make


__all__ = ["RoutedLinear", "routed_linear_factory"]
