"""WEMoE's adaptation: only the routers train (``wemoe.adaptation``), then a check for collapse."""

from __future__ import annotations

import numpy as np
import torch

from wemoe.adaptation import distributed
from wemoe.adaptation.loop import AdaptResult, adapt_parameters
from wemoe.adaptation.objectives import Objective, entropy
from wemoe.data import TaskData, preprocess
from wemoe.model.heads import Head
from wemoe.model.vit import RoutingTrace
from wemoe.moe.model import WEMoEModel


def adapt_routers(
    model: WEMoEModel,
    heads: dict[str, Head],
    data: dict[str, TaskData],
    steps: int = 1000,
    lr: float = 1e-4,
    batch_size: int = 16,
    cosine: bool = False,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    objective: Objective | None = None,
) -> AdaptResult:
    """WEMoE's test-time adaptation: only the routers train; then a check for collapse."""
    result = adapt_parameters(
        model,
        model.router_parameters(),
        heads,
        data,
        model.arch,
        steps,
        lr,
        batch_size,
        cosine,
        seed,
        device,
        progress,
        desc="adapting routers",
        objective=objective,
    )
    if distributed.current().main:  # the rank that writes the output records the diagnostics
        result.diagnostics, result.warnings = collapse_check(model, heads, data, device, seed)
    return result


@torch.no_grad()
def collapse_check(model: WEMoEModel, heads: dict[str, Head], data: dict[str, TaskData], device: str, seed: int, n: int = 64):
    """Signs that entropy minimisation collapsed: routing that ignores the input (the same
    coefficients for the images of every task), coefficients far outside the usual range,
    or predictions with ~zero entropy that all fall in one class."""
    rng = np.random.default_rng(seed + 1)
    routed, warnings = [], []
    per_task = {}
    for task, d in data.items():
        idx = rng.choice(len(d), size=min(n, len(d)), replace=False)
        images = preprocess(d.take(idx), model.arch, device)
        trace = RoutingTrace()
        logits = heads[task].logits(model.encode(images, trace))
        routed.append(torch.stack(trace.routes))  # (routes, B, T)
        top_share = torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]).max().item() / len(idx)
        per_task[task] = {"entropy": entropy(logits).item(), "top_class_share": top_share}
    stacked = torch.cat(routed, dim=1)  # every task's images: a router that tells tasks apart spreads them
    lo, hi = stacked.min().item(), stacked.max().item()
    diag = {"routing_spread": stacked.std(dim=1).mean().item(), "coef_min": lo, "coef_max": hi, "tasks": per_task}
    if diag["routing_spread"] < 1e-3:
        warnings.append(f"routing hardly depends on the input (spread {diag['routing_spread']:.2e}): the routers may have collapsed")
    if lo < -1.0 or hi > 2.0:
        warnings.append(f"routing coefficients reach [{lo:.2f}, {hi:.2f}], far outside the usual 0..1: consider --coef-range")
    for task, s in per_task.items():
        if s["entropy"] < 1e-3 and s["top_class_share"] > 0.5:
            warnings.append(f"task '{task}': predictions collapsed to one class ({100 * s['top_class_share']:.0f}% of images) with ~zero entropy")
    return diag, warnings


__all__ = ["adapt_routers", "collapse_check"]
