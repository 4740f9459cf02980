"""``prototype`` routers: softmax of the cosine similarity between a sample's token-mean router input
and one prototype per task, in the spirit of mixture-of-introvert-experts. Training-free.

The prototype of a task is the mean token-averaged router input of that task's adaptation
images. The router inputs of a block depend on how the earlier blocks routed; the
prototypes are taken with every image routed to its own task's expert (one forward pass
per task, no gradients), i.e. what a group's input looks like when the routing before it
was right - the state a correct router keeps the model in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wemoe.core.params import param
from wemoe.data import TaskData, preprocess
from wemoe.errors import UsageError
from wemoe.model.vit import RoutingTrace
from wemoe.moe.routers.base import ROUTERS, RouterCheck, RouterKind, keep_top_k

DEFAULT_TEMPERATURE = 0.05
TEMPERATURE_HELP = "softmax temperature of prototype/subspace routers (0: 0.05 / 1.0)"
TOP_K_HELP = "prototype/subspace routers keep the k largest weights (0: all)"
IMAGES_HELP = "prototype/task routers: images per task they are fitted on"


class PrototypeRouter(nn.Module):
    """softmax_t(cos(mean_n h_n, p_t) / temperature), top-k; ``prototypes`` (T, D) are fitted from data."""

    def __init__(self, width: int, num_experts: int, temperature: float = 0.05, top_k: int = 0):
        super().__init__()
        self.width, self.num_experts = int(width), int(num_experts)
        self.temperature, self.top_k = float(temperature), int(top_k)
        self.prototypes = nn.Parameter(torch.zeros(num_experts, width))

    def materialize(self, device: torch.device | str = "cpu") -> None:
        self.to_empty(device=device)
        with torch.no_grad():
            self.prototypes.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.to(self.prototypes.dtype).mean(dim=1)
        sim = F.normalize(m, dim=-1) @ F.normalize(self.prototypes, dim=-1).t()
        return keep_top_k(torch.softmax(sim / self.temperature, dim=-1), self.top_k)

    def extra_repr(self) -> str:
        return f"width={self.width}, num_experts={self.num_experts}, temperature={self.temperature}, top_k={self.top_k}"


@torch.no_grad()
def task_prototypes(
    model: Any, data: Mapping[str, TaskData], images: int = 256, seed: int = 0, device: str = "cpu", batch_size: int = 64
) -> dict[str, list[torch.Tensor]]:
    """``{task: [mean router input (D,) per routing entry]}`` with each task routed to its own expert."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[torch.Tensor]] = {}
    for task, d in data.items():
        idx = np.sort(rng.choice(len(d), size=min(images, len(d)), replace=False))
        onehot = torch.zeros(len(model.task_names))
        onehot[model.task_names.index(task)] = 1.0
        sums: list[torch.Tensor] | None = None
        with model.fixed_routing(onehot):
            for start in range(0, len(idx), batch_size):
                trace = RoutingTrace(keep_inputs=True)
                model.encode(preprocess(d.take(idx[start : start + batch_size]), model.arch, device), trace)
                batch = [m.float().sum(0) for m in trace.inputs]
                sums = batch if sums is None else [a + b for a, b in zip(sums, batch)]
        out[task] = [s / len(idx) for s in sums]
    return out


@ROUTERS.register
class Prototype(RouterKind):
    name = "prototype"
    summary = "cosine similarity to each task's mean router input (training-free, needs --data for every task)"
    fitted = True

    @dataclass(frozen=True)
    class Options:
        temperature: float = param(0.0, TEMPERATURE_HELP, key="router_temperature", low=0.0)
        top_k: int = param(0, TOP_K_HELP, key="router_top_k", low=0)
        images: int = param(256, IMAGES_HELP, key="router_images", low=1)

    def check(self, ctx: RouterCheck) -> None:
        missing = [t for t in ctx.task_names if t not in ctx.data_sizes]
        if missing:
            raise UsageError(f"--router prototype needs --data for every task (missing: {', '.join(missing)})")

    def build(self, width: int, num_experts: int, init_lambda: float) -> nn.Module:
        return PrototypeRouter(width, num_experts, self.options.temperature or DEFAULT_TEMPERATURE, self.options.top_k)

    def fit(self, model: Any, data: Mapping[str, TaskData], seed: int, device: str) -> None:
        protos = task_prototypes(model, data, self.options.images, seed, device)
        for k, router in enumerate(model.routers()):
            with torch.no_grad():
                router.prototypes.copy_(torch.stack([protos[t][k] for t in model.task_names]))

    def record(self) -> dict:
        return {"temperature": self.options.temperature or None, "top_k": self.options.top_k}


__all__ = ["Prototype", "PrototypeRouter", "task_prototypes"]
