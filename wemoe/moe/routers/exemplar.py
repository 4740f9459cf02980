"""``exemplar`` routers: nearest neighbours among stored images of every task. Training-free.

The model stores the image embeddings (from the pass with the pretrained routed weights,
``WEMoEModel.router_features``) of ``--router-images`` unlabeled adaptation images per task,
as the mixture of introvert experts and Auto-Switch do. An image's coefficients are the
share of its ``--router-neighbours`` most similar stored images (cosine) that belong to
each task. Nothing is trained; the stored embeddings are part of the output.
"""

from __future__ import annotations

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
from wemoe.moe.routers.base import ROUTERS, RouterCheck, RouterKind
from wemoe.moe.routers.prototype import IMAGES_HELP


class ExemplarRouter(nn.Module):
    """Coefficients = the share of the k nearest stored embeddings (cosine) that each task owns."""

    def __init__(self, embed: int, num_experts: int, per_task: int, neighbours: int):
        super().__init__()
        self.embed, self.num_experts, self.per_task, self.neighbours = int(embed), int(num_experts), int(per_task), int(neighbours)
        self.register_buffer("exemplars", torch.zeros(num_experts * per_task, embed))
        self.register_buffer("owners", torch.arange(num_experts).repeat_interleave(per_task))

    def materialize(self, device: torch.device | str = "cpu") -> None:
        self.to_empty(device=device)
        with torch.no_grad():
            self.exemplars.zero_()
            self.owners.copy_(torch.arange(self.num_experts, device=device).repeat_interleave(self.per_task))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        query = F.normalize(features[:, -self.embed :].to(self.exemplars.dtype), dim=-1)
        nearest = (query @ self.exemplars.t()).topk(min(self.neighbours, len(self.exemplars)), dim=-1).indices
        votes = F.one_hot(self.owners[nearest], self.num_experts).to(query.dtype)
        return votes.mean(dim=1)

    def extra_repr(self) -> str:
        return f"embed={self.embed}, num_experts={self.num_experts}, per_task={self.per_task}, neighbours={self.neighbours}"


@ROUTERS.register
class Exemplar(RouterKind):
    name = "exemplar"
    summary = "nearest neighbours among stored embeddings of --router-images images per task (training-free, one router per model)"
    fitted = True
    shared = True
    trainable = False

    @dataclass(frozen=True)
    class Options:
        images: int = param(256, IMAGES_HELP, key="router_images", low=1)
        neighbours: int = param(10, "exemplar routers: nearest stored images that vote", key="router_neighbours", low=1)

    def check(self, ctx: RouterCheck) -> None:
        missing = [t for t in ctx.task_names if t not in ctx.data_sizes]
        if missing:
            raise UsageError(f"--router exemplar stores images of every task: give --data for every task (missing: {', '.join(missing)})")
        short = {t: n for t, n in ctx.data_sizes.items() if n < self.options.images}
        if short:
            listed = ", ".join(f"{t} has {n}" for t, n in short.items())
            raise UsageError(f"--router exemplar stores --router-images {self.options.images} images per task, but {listed}")

    def build_shared(self, arch: ViTArch, num_experts: int, init_lambda: float) -> nn.Module:
        return ExemplarRouter(arch.output_dim, num_experts, self.options.images, self.options.neighbours)

    @torch.no_grad()
    def fit(self, model: Any, data: Mapping[str, TaskData], seed: int, device: str) -> dict:
        rng = np.random.default_rng(seed)
        router: ExemplarRouter = model.task_router
        for t, task in enumerate(model.task_names):
            d = data[task]
            idx = np.sort(rng.choice(len(d), size=self.options.images, replace=False))
            rows = []
            for start in range(0, len(idx), 128):
                feats = model.router_features(preprocess(d.take(idx[start : start + 128]), model.arch, device))
                rows.append(F.normalize(feats[:, -router.embed :], dim=-1))
            router.exemplars[t * router.per_task : (t + 1) * router.per_task] = torch.cat(rows).to(router.exemplars.device)
        return {"exemplars": router.per_task * router.num_experts}


__all__ = ["Exemplar", "ExemplarRouter"]
