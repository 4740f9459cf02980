"""A router, an expert store and an objective that live only in the tests: registering them must be all it takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wemoe.adaptation.objectives import OBJECTIVES, Objective
from wemoe.core.params import param
from wemoe.errors import WemoeError
from wemoe.moe.experts import EXPERT_STORES, ExpertStore, ExpertStoreKind, TaskVectors
from wemoe.moe.routers import ROUTERS, RouterKind


class LevelRouter(nn.Module):
    """Every sample gets the same learnable coefficients, starting at ``level``."""

    def __init__(self, num_experts: int, level: float):
        super().__init__()
        self.level = level
        self.coefficients = nn.Parameter(torch.full((num_experts,), level))

    def materialize(self, device: torch.device | str = "cpu") -> None:
        self.to_empty(device=device)
        with torch.no_grad():
            self.coefficients.fill_(self.level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficients.unsqueeze(0).expand(x.shape[0], -1)


@ROUTERS.register
class ToyLevel(RouterKind):
    name = "toy-level"
    summary = "constant coefficients starting at --toy-level (a test kind)"

    @dataclass(frozen=True)
    class Options:
        level: float = param(0.5, "starting coefficient of every expert", key="toy_level", low=0.0, high=1.0)

    def build(self, width: int, num_experts: int, init_lambda: float) -> nn.Module:
        return LevelRouter(num_experts, self.options.level)


class SignExperts(ExpertStore):
    """Each weight task vector as its sign times one scale per task (its mean absolute value)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, device=None):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.register_buffer("signs", torch.empty(num_experts, out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(num_experts, device=device))
        self.register_buffer("bias", torch.empty(num_experts, out_features, device=device))

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.signs.float() * self.scale[:, None, None], self.bias

    def apply(self, x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        dw, db = self.task_vectors()
        w = weight + torch.einsum("bt,toi->boi", coefs.to(dw.dtype), dw)
        return torch.einsum("bni,boi->bno", x.to(w.dtype), w) + (bias + coefs.to(db.dtype) @ db)[:, None, :]


@EXPERT_STORES.register
class ToySign(ExpertStoreKind):
    name = "toy-sign"
    summary = "sign of every task vector entry times one scale per task (a test kind)"

    @dataclass(frozen=True)
    class Options:
        shrink: float = param(1.0, "factor on every task's scale", key="toy_shrink", low=0.0, low_open=True)

    def build(self, num_experts: int, in_features: int, out_features: int, device=None) -> ExpertStore:
        return SignExperts(num_experts, in_features, out_features, device)

    def weight_buffers(self, vectors: TaskVectors, out_features: int, in_features: int) -> tuple[dict[str, torch.Tensor], Any]:
        taus = vectors.stack()
        scale = taus.abs().mean(dim=(1, 2)) * self.options.shrink
        return {"signs": torch.sign(taus).to(torch.int8), "scale": scale}, None


@OBJECTIVES.register
class ToyMargin(Objective):
    name = "toy-margin"
    summary = "minus the mean top-1 log-probability (a test kind)"

    @dataclass(frozen=True)
    class Options:
        weight: float = param(1.0, "scale of the toy loss", key="toy_weight", low=0.0)

    def loss(self, logits: torch.Tensor, routes, expert: int) -> torch.Tensor:
        return -self.options.weight * F.log_softmax(logits.float(), dim=-1).max(dim=-1).values.mean()

    def describe(self) -> str:
        return f"{self.options.weight:g} x minus mean top-1 log-probability"


KINDS = {"router": (ROUTERS, ToyLevel), "store": (EXPERT_STORES, ToySign), "objective": (OBJECTIVES, ToyMargin)}


def register_all() -> None:
    for registry, cls in KINDS.values():
        if cls.name not in registry.names():
            registry.register(cls)


def unregister_all() -> None:
    for registry, cls in KINDS.values():
        registry.unregister(cls.name)


__all__ = ["KINDS", "SignExperts", "ToyLevel", "ToyMargin", "ToySign", "WemoeError", "register_all", "unregister_all"]
