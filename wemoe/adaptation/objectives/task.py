"""``task`` and ``entropy+task``: the routing pulled toward the expert of the task a batch came from.

It uses the task identity the adaptation data comes with (each task's unlabeled
images are given apart), as a router must later infer it from the image alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wemoe.adaptation.objectives.base import OBJECTIVES, Objective
from wemoe.adaptation.objectives.entropy import entropy
from wemoe.core.params import param


def task_identity_loss(routes: list[torch.Tensor], expert: int) -> torch.Tensor:
    """Mean squared distance of every (B, T) coefficient vector to one-hot on ``expert``."""
    target = torch.zeros_like(routes[0])
    target[:, expert] = 1.0
    return torch.stack([F.mse_loss(r.float(), target.float()) for r in routes]).mean()


@OBJECTIVES.register
class TaskIdentity(Objective):
    name = "task"
    summary = "sum over tasks of the routing's mean squared distance to one-hot on the task's own expert"
    uses_routing = True

    def loss(self, logits: torch.Tensor, routes: list[torch.Tensor] | None, expert: int) -> torch.Tensor:
        assert routes is not None
        return task_identity_loss(routes, expert)


@OBJECTIVES.register
class EntropyAndTask(Objective):
    name = "entropy+task"
    summary = "entropy plus the task term, weighted by --task-weight"
    uses_routing = True

    @dataclass(frozen=True)
    class Options:
        task_weight: float = param(1.0, "weight of the task term in entropy+task", low=0.0)

    def loss(self, logits: torch.Tensor, routes: list[torch.Tensor] | None, expert: int) -> torch.Tensor:
        assert routes is not None
        return entropy(logits) + self.options.task_weight * task_identity_loss(routes, expert)

    def describe(self) -> str:
        return f"sum over tasks of mean prediction entropy + {self.options.task_weight:g} x routing distance to one-hot on the own expert"


__all__ = ["EntropyAndTask", "TaskIdentity", "task_identity_loss"]
