"""What router (and coefficient) adaptation minimises, one small registry.

Adaptation sees, for every task, a batch of that task's UNLABELED images, so it
knows two things: the predictions of the task's own head, and which task the
batch came from. Class labels are never read. An objective turns a task's
batch into a loss from those:

* ``entropy`` (the paper's): mean Shannon entropy of the head's predictions.
* ``task``: the routing coefficients of every routed group pulled toward one-hot
  on the batch's own expert (mean squared error over experts and groups). It
  uses the task identity the adaptation data comes with, as a router must later
  infer it from the image alone.
* ``entropy+task``: their sum, the task term weighted by ``task_weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wemoe.errors import WemoeError


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the batch."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def task_identity_loss(routes: list[torch.Tensor], expert: int) -> torch.Tensor:
    """Mean squared distance of every (B, T) coefficient vector to one-hot on ``expert``."""
    target = torch.zeros_like(routes[0])
    target[:, expert] = 1.0
    return torch.stack([F.mse_loss(r.float(), target.float()) for r in routes]).mean()


@dataclass(frozen=True)
class Objective:
    """``loss(logits, routes, expert)``: routes is the model's routing (None when ``uses_routing`` is False)."""

    name: str
    description: str
    uses_routing: bool
    loss: Callable[[torch.Tensor, list[torch.Tensor] | None, int], torch.Tensor]


def make_objective(name: str, task_weight: float = 1.0) -> Objective:
    if name == "entropy":
        return Objective(name, "sum over tasks of mean prediction entropy", False, lambda logits, _routes, _e: entropy(logits))
    if name == "task":
        return Objective(
            name,
            "sum over tasks of the routing's mean squared distance to one-hot on the task's own expert",
            True,
            lambda _logits, routes, e: task_identity_loss(routes, e),
        )
    if name == "entropy+task":
        return Objective(
            name,
            f"sum over tasks of mean prediction entropy + {task_weight:g} x routing distance to one-hot on the own expert",
            True,
            lambda logits, routes, e: entropy(logits) + task_weight * task_identity_loss(routes, e),
        )
    raise WemoeError(f"unknown objective '{name}' (known: {', '.join(OBJECTIVES)})")


OBJECTIVES = ("entropy", "task", "entropy+task")

__all__ = ["OBJECTIVES", "Objective", "entropy", "make_objective", "task_identity_loss"]
