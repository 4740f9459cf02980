"""Slow, obviously-correct reference for ``WeightEnsemblingMLP`` (tests, benchmarks).

One Python iteration per sample: merge the four MLP tensors from the module's
buffers with that sample's coefficients, then run ``F.linear -> act ->
F.linear``. Differentiable with plain autograd (wrt the router parameters, the
input, and a routing override).

Two ways to merge a sample's weights: ``"einsum"`` (one contraction over the
expert axis per tensor: already vectorised inside the sample) and ``"loop"``
(``W = W + r_i * tau_i`` expert after expert, each step a new tensor: the way
the original WEMoE / FusionBench module merges a state dict per sample). The
speed benchmark reports WEMoE against both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _merge_einsum(w: torch.Tensor, c: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return w + torch.einsum("t,t...->...", c, experts)


def _merge_loop(w: torch.Tensor, c: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    for i in range(experts.shape[0]):
        w = w + c[i] * experts[i]
    return w


MERGES = {"einsum": _merge_einsum, "loop": _merge_loop}


def naive_moe_forward(module, x: torch.Tensor, routing: torch.Tensor | None = None, merge: str = "einsum") -> torch.Tensor:
    """Per-sample loop equivalent of ``module(x, routing)``; computes in the buffer dtype."""
    if routing is None:
        r = module.routing_weights(x)
    else:
        r = torch.as_tensor(routing, device=x.device)
        if r.dim() == 1:
            r = r.unsqueeze(0).expand(x.shape[0], -1)
    dtype = module.fc1_weight.dtype
    r = r.to(dtype)
    xc = x.to(dtype)
    # Natural nn.Linear layouts; fc2 is stored transposed in the module.
    w1, b1 = module.fc1_weight, module.fc1_bias  # (H, D), (H,)
    w2, b2 = module.fc2_weight_t.t(), module.fc2_bias  # (D, H), (D,)
    e_w1, e_b1 = module.expert_fc1_weight, module.expert_fc1_bias  # (T, H, D), (T, H)
    e_w2, e_b2 = module.expert_fc2_weight_t.transpose(1, 2), module.expert_fc2_bias  # (T, D, H), (T, D)
    merged = MERGES[merge]
    outs = []
    for b in range(x.shape[0]):
        c = r[b]
        fc1_w = merged(w1, c, e_w1)
        fc1_b = merged(b1, c, e_b1)
        fc2_w = merged(w2, c, e_w2)
        fc2_b = merged(b2, c, e_b2)
        h = module.act(F.linear(xc[b], fc1_w, fc1_b))
        outs.append(F.linear(h, fc2_w, fc2_b))
    return torch.stack(outs).to(x.dtype)


__all__ = ["naive_moe_forward"]
