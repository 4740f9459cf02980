"""``task`` routers: one router per model that says which task an image is, computed once per image.

Per-block routers read a block's token mean, which tells the zoo's tasks apart only about as
well as a probe on it can (about 93-95%). This router reads more: one pass with the
pretrained weight of every routed linear, and from it each block's token mean and class
token and the image embedding (``WEMoEModel.router_features``). A 2-layer MLP on these
(standardised) gives a task posterior, ``softmax(logits / temperature)``, which is every
routed group's coefficients: confident images go to their own expert, ambiguous ones get
a mixture. It costs one more forward pass of the pretrained model.

It is fitted before adaptation: trained with cross-entropy to say which task each of the
adaptation images came from (the task identity the unlabeled data comes with; class labels
are never read), on features computed once. ``--steps`` of adaptation may follow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wemoe.core.arch import ViTArch
from wemoe.core.params import param
from wemoe.data import TaskData, preprocess
from wemoe.errors import UsageError
from wemoe.moe.routers.augment import AUGMENT_HELP, AUGMENTS, Views, augmenter
from wemoe.moe.routers.base import ROUTERS, RouterCheck, RouterKind
from wemoe.moe.routers.prototype import IMAGES_HELP, TEMPERATURE_HELP

DEFAULT_TEMPERATURE = 1.0
MIN_STEPS = 500  # small adaptation sets get this many optimiser steps however few epochs that makes


def feature_size(arch: ViTArch) -> int:
    """Width of ``WEMoEModel.router_features``: per block a token mean and a class token, then the embedding."""
    return 2 * arch.depth * arch.width + arch.output_dim


class TaskRouter(nn.Module):
    """Standardised features -> Linear -> ReLU -> Linear -> softmax over tasks (a task posterior)."""

    def __init__(self, features: int, num_experts: int, hidden: int, temperature: float = DEFAULT_TEMPERATURE):
        super().__init__()
        self.features, self.num_experts, self.temperature = int(features), int(num_experts), float(temperature)
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, num_experts)

    def materialize(self, device: torch.device | str = "cpu") -> None:
        self.to_empty(device=device)
        with torch.no_grad():
            self.mean.zero_()
            self.std.fill_(1.0)
        self.hidden.reset_parameters()
        self.out.reset_parameters()

    def logits(self, features: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        z = (features.to(self.mean.dtype) - self.mean) / self.std
        if dropout:
            z = F.dropout(z, dropout, training=True)
        return self.out(torch.relu(self.hidden(z)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(features) / self.temperature, dim=-1)

    def extra_repr(self) -> str:
        return f"features={self.features}, num_experts={self.num_experts}, temperature={self.temperature}"


@torch.no_grad()
def task_features(
    model: Any, data: Mapping[str, TaskData], images: int, seed: int, device: str, batch_size: int = 128, views: Views | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_features`` of up to ``images`` images per task (drawn with ``seed``) and the index of each one's task;
    with ``views``, followed by those of one augmented view of each image (seeded per task and batch; each image read once)."""
    rng = np.random.default_rng(seed)
    feats, augmented, labels = [], [], []
    for t, (task, d) in enumerate(data.items()):
        idx = np.sort(rng.choice(len(d), size=min(images, len(d)), replace=False))
        for start in range(0, len(idx), batch_size):
            raw = d.take(idx[start : start + batch_size])
            feats.append(model.router_features(preprocess(raw, model.arch, device)).cpu())
            if views is not None:
                view = views(raw, seed * 1_000_003 + t * 10_007 + start)
                augmented.append(model.router_features(preprocess(view, model.arch, device)).cpu())
        labels += [model.task_names.index(task)] * len(idx)
    copies = 2 if views is not None else 1
    return torch.cat(feats + augmented), torch.tensor(labels * copies)


def train_classifier(router: TaskRouter, feats: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, lr: float = 1e-3, batch: int = 128) -> float:
    """Cross-entropy on (features, task) pairs, AdamW with cosine decay, ``epochs`` passes (at least ``MIN_STEPS``
    steps); returns the last pass's training accuracy."""
    device = router.mean.device
    with torch.no_grad():
        std = feats.std(0)
        router.mean.copy_(feats.mean(0).to(device))
        router.std.copy_(torch.where(std > 1e-4, std, torch.ones_like(std)).to(device))  # a constant feature (block 0's class token) stays as it is
    feats, labels = feats.to(device), labels.to(device)
    params = [router.hidden.weight, router.hidden.bias, router.out.weight, router.out.bias]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    per_epoch = math.ceil(len(feats) / batch)
    epochs = max(epochs, math.ceil(MIN_STEPS / per_epoch))
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for p in params:
        p.requires_grad_(True)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(feats), generator=g).to(device)
            correct = 0
            for start in range(0, len(feats), batch):
                b = order[start : start + batch]
                logits = router.logits(feats[b], dropout=0.1)
                loss = F.cross_entropy(logits, labels[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                correct += int((logits.argmax(-1) == labels[b]).sum())
    for p in params:
        p.requires_grad_(False)
    return correct / len(feats)


@ROUTERS.register
class Task(RouterKind):
    name = "task"
    summary = "one router per model: a task posterior from a pass with the pretrained weights, fitted on which task each adaptation image is"
    fitted = True
    shared = True

    @dataclass(frozen=True)
    class Options:
        temperature: float = param(0.0, TEMPERATURE_HELP, key="router_temperature", low=0.0)
        images: int = param(256, IMAGES_HELP, key="router_images", low=1)
        hidden: int = param(256, "task routers: hidden units of the 2-layer MLP", key="router_hidden", low=1)
        epochs: int = param(30, "task routers: epochs of fitting on the adaptation images' features (at least 500 steps)", key="router_epochs", low=1)
        augment: str = param("none", AUGMENT_HELP, key="router_augment", choices=AUGMENTS)

    def check(self, ctx: RouterCheck) -> None:
        missing = [t for t in ctx.task_names if t not in ctx.data_sizes]
        if missing:
            raise UsageError(f"--router task is fitted on every task's images: give --data for every task (missing: {', '.join(missing)})")

    def build_shared(self, arch: ViTArch, num_experts: int, init_lambda: float) -> nn.Module:
        return TaskRouter(feature_size(arch), num_experts, self.options.hidden, self.options.temperature or DEFAULT_TEMPERATURE)

    def fit(self, model: Any, data: Mapping[str, TaskData], seed: int, device: str) -> dict:
        # with --router-augment, each image once more as an augmented view: the router sees both
        feats, labels = task_features(model, data, self.options.images, seed, device, views=augmenter(self.options.augment))
        accuracy = train_classifier(model.task_router, feats, labels, self.options.epochs, seed)
        return {"images": len(labels), "train_accuracy": round(accuracy, 6)}

    def record(self) -> dict:
        """The options; ``augment`` only where it is not ``none`` (records of routers fitted on clean images are unchanged)."""
        o = self.options
        extra = {"augment": o.augment} if o.augment != "none" else {}
        return {"temperature": o.temperature or None, "images": o.images, "hidden": o.hidden, "epochs": o.epochs, **extra}


__all__ = ["Task", "TaskRouter", "feature_size", "task_features", "train_classifier"]
