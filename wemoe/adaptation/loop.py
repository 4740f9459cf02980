"""Test-time adaptation: the only training WEMoE (its routers) and AdaMerging (its coefficients) do.

Loss = sum over tasks of an objective (``wemoe.adaptation.objectives``; by default the
mean Shannon entropy of that task's predictions with its own frozen head) on a batch
of its UNLABELED images. Backbone, experts and heads stay frozen; one backward per
task keeps only one task's activations in memory at a time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wemoe.adaptation import distributed
from wemoe.adaptation.objectives import Entropy, Objective
from wemoe.core.arch import ViTArch
from wemoe.data import TaskData, preprocess
from wemoe.model.heads import Head
from wemoe.model.vit import RoutingTrace


@dataclass
class AdaptResult:
    steps: int
    final_loss: float | None
    initial_loss: float | None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    diagnostics: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _sampler(n: int, batch_size: int, rng: np.random.Generator):
    """Random batches: distinct images within a batch (unless the task has fewer)."""
    while True:
        yield rng.choice(n, size=batch_size, replace=batch_size > n)


def adapt_parameters(
    model: nn.Module,
    params: list[nn.Parameter],
    heads: dict[str, Head],
    data: dict[str, TaskData],
    arch: ViTArch,
    steps: int,
    lr: float,
    batch_size: int = 16,
    cosine: bool = False,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "adapting",
    objective: Objective | None = None,
) -> AdaptResult:
    """Train ``params`` (and nothing else of ``model``) to minimise ``objective`` (default: entropy).

    Each step draws ``batch_size`` images of every task (in ``data``'s order, from one
    seeded generator) and back-propagates each task's loss on its own, so only one
    task's activations are held at a time. Objectives that use routing get the
    model's routing of the batch and the index of the batch's own task among
    ``model.task_names``; labels are never read. Under torchrun each rank computes
    only its share of every step and the gradients are summed (``wemoe.adaptation.distributed``).
    """
    objective = objective or Entropy()
    experts = {t: model.task_names.index(t) for t in data} if objective.uses_routing else {}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train(False)
    opt = torch.optim.Adam(params, lr=lr) if steps else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))) if cosine and opt else None
    rng = np.random.default_rng(seed)
    samplers = {t: _sampler(len(d), batch_size, rng) for t, d in data.items()}
    schedule = distributed.StepSchedule.start(data, samplers, params)
    result = AdaptResult(steps=steps, final_loss=None, initial_loss=None)
    started = time.perf_counter()
    with tqdm(range(steps), desc=desc, unit="step", disable=not progress) as bar:
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for task, d, indices, weight in schedule.pieces():
                images = preprocess(d.take(indices), arch, device)
                if objective.uses_routing:
                    trace = RoutingTrace()
                    loss = objective.loss(heads[task].logits(model.encode(images, trace)), trace.routes, experts[task])
                else:
                    loss = objective.loss(heads[task].logits(model(images)), None, -1)
                if weight != 1.0:
                    loss = loss * weight
                loss.backward()
                total += loss.item()
            total = schedule.combine(params, total)
            opt.step()
            if sched is not None:
                sched.step()
            result.losses.append(total)
            if result.initial_loss is None:
                result.initial_loss = total
            bar.set_postfix(loss=f"{total:.4f}")
    for p in params:
        p.requires_grad_(False)
    result.final_loss = result.losses[-1] if result.losses else None
    result.seconds = time.perf_counter() - started
    return result


__all__ = ["AdaptResult", "adapt_parameters"]
