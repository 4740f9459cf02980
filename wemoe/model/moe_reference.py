"""Slow, obviously-correct references for WEMoE models (tests, benchmarks).

One Python iteration per sample, the way the original WEMoE / FusionBench code
works: compute the sample's routing, merge its weights, run a plain layer.
Nothing of the tiled kernels or the low-rank algebra is used: the task vectors
come from ``experts.task_vectors()`` (for low-rank experts, the truncated ones),
merged with plain arithmetic.

``merge="einsum"`` merges a tensor with one contraction over the expert axis;
``merge="loop"`` adds ``c_i * tau_i`` expert after expert (each step a new
tensor), as the original module does. The speed benchmark times both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wemoe.model.routed import RoutedLinear


def _merge_einsum(w: torch.Tensor, c: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return w + torch.einsum("t,t...->...", c, experts)


def _merge_loop(w: torch.Tensor, c: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    for i in range(experts.shape[0]):
        w = w + c[i] * experts[i]
    return w


MERGES = {"einsum": _merge_einsum, "loop": _merge_loop}


def merged_linear(layer: RoutedLinear, c: torch.Tensor, merge: str = "einsum") -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's weight and bias: W0 + sum_i c_i dW_i, b0 + sum_i c_i db_i."""
    dw, db = layer.experts.task_vectors()
    c = c.to(layer.weight.dtype)
    return MERGES[merge](layer.weight, c, dw), MERGES[merge](layer.bias, c, db)


def linear_reference(layer, x: torch.Tensor, coefs: torch.Tensor | None, merge: str = "einsum") -> torch.Tensor:
    """``layer(x, coefs)`` one sample at a time (plain layers are plain)."""
    if not isinstance(layer, RoutedLinear):
        return F.linear(x, layer.weight, layer.bias)
    out = []
    for b in range(x.shape[0]):
        w, bias = merged_linear(layer, coefs[b], merge)
        out.append(F.linear(x[b : b + 1].to(w.dtype), w, bias))
    return torch.cat(out).to(x.dtype)


def block_reference(block, x: torch.Tensor, merge: str = "einsum") -> torch.Tensor:
    """A (MoE) block written out: routing from its routers, then per-sample merged linears."""
    h = block.norm1(x)
    c = block.coefficients("attn", h)
    b, n, d = h.shape
    qkv = linear_reference(block.attn.qkv, h, c, merge).reshape(b, n, 3, block.attn.heads, d // block.attn.heads).permute(2, 0, 3, 1, 4)
    att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, d)
    x = x + linear_reference(block.attn.proj, att, c, merge)
    h = block.norm2(x)
    c = block.coefficients("mlp", h)
    a = block.mlp._act(linear_reference(block.mlp.fc1, h, c, merge))
    return x + linear_reference(block.mlp.fc2, a, c, merge)


def reference_forward(model, images: torch.Tensor, merge: str = "einsum") -> torch.Tensor:
    """``model(images)`` for a WEMoE (or plain) ViT, sample by sample and layer by layer."""
    outs = []
    for i in range(images.shape[0]):
        x = model.tokens(images[i : i + 1])
        for block in model.blocks:
            x = block_reference(block, x, merge)
        outs.append(model.head(model.norm(x[:, 0])))
    return torch.cat(outs)


__all__ = ["block_reference", "linear_reference", "merged_linear", "reference_forward"]
