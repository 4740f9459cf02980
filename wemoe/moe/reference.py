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

from wemoe.moe.block import MoEBlock
from wemoe.moe.rest import RoutedLayerNorm
from wemoe.moe.routed import RoutedLinear


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


def norm_reference(norm, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """A (routed) LayerNorm for one sample: its merged weight and bias, then a plain LayerNorm."""
    if isinstance(norm, RoutedLayerNorm) and c is not None:
        merged = norm.merged(c[0])
        return F.layer_norm(x, (norm.width,), merged["weight"], merged["bias"], norm.eps)
    return norm(x)


def block_reference(block, x: torch.Tensor, merge: str = "einsum", given: torch.Tensor | None = None) -> torch.Tensor:
    """A (MoE) block written out: routing from its routers (or ``given``), then per-sample merged linears and norms."""
    routed = isinstance(block, MoEBlock)
    c = given if routed and given is not None else None
    h = norm_reference(block.norm1, x, c)
    c = c if c is not None else block.coefficients("attn", h)
    b, n, d = h.shape
    qkv = linear_reference(block.attn.qkv, h, c, merge).reshape(b, n, 3, block.attn.heads, d // block.attn.heads).permute(2, 0, 3, 1, 4)
    att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, d)
    x = x + linear_reference(block.attn.proj, att, c, merge)
    c = given if routed and given is not None else None
    h = norm_reference(block.norm2, x, c)
    c = c if c is not None else block.coefficients("mlp", h)
    a = block.mlp._act(linear_reference(block.mlp.fc1, h, c, merge))
    return x + linear_reference(block.mlp.fc2, a, c, merge)


def stem_reference(model, image: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """Tokens of one image; with ``--experts all``, from the merged patch embedding, class token, positions and pre-norm."""
    if c is None or not getattr(model.spec, "rest", False):
        return model.tokens(image)
    conv = model.patch_embed.proj.merged(c[0])
    x = F.conv2d(image, conv["weight"], conv.get("bias"), stride=model.patch_embed.proj.patch).flatten(2).transpose(1, 2)
    cls = model.cls_token + torch.tensordot(c[0], model.embed_experts.cls_token, dims=1)
    pos = model.pos_embed + torch.tensordot(c[0], model.embed_experts.pos_embed, dims=1)
    return norm_reference(model.norm_pre, torch.cat([cls, x], dim=1) + pos, c)


def head_reference(model, cls: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    if c is None or not getattr(model.spec, "rest", False):
        return model.head(model.norm(cls))
    x = norm_reference(model.norm, cls, c)
    head = model.head.merged(c[0])
    return F.linear(x, head["weight"], head.get("bias"))


def reference_forward(model, images: torch.Tensor, merge: str = "einsum") -> torch.Tensor:
    """``model(images)`` for a WEMoE (or plain) ViT, sample by sample and layer by layer."""
    outs = []
    for i in range(images.shape[0]):
        image = images[i : i + 1]
        given = model.given_coefficients(image) if hasattr(model, "given_coefficients") else None  # a shared router, or fixed routing
        x = stem_reference(model, image, given)
        for block in model.blocks:
            x = block_reference(block, x, merge, given)
        outs.append(head_reference(model, x[:, 0], given))
    return torch.cat(outs)


__all__ = ["block_reference", "head_reference", "linear_reference", "merged_linear", "norm_reference", "reference_forward", "stem_reference"]
