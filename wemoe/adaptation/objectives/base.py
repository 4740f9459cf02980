"""What adaptation minimises: a small registry of objectives (``--objective``).

Adaptation sees, for every task, a batch of that task's UNLABELED images, so it
knows two things: the predictions of the task's own head, and which task the
batch came from. Class labels are never read. An objective turns a task's batch
into a loss from those; one that ``uses_routing`` also gets the model's routing
of the batch (methods without routing, AdaMerging, refuse it).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from wemoe.core.registry import Kind, Registry


class Objective(Kind):
    """An objective with its options: ``loss(logits, routes, expert)`` for one task's batch."""

    uses_routing: ClassVar[bool] = False

    def loss(self, logits: torch.Tensor, routes: list[torch.Tensor] | None, expert: int) -> torch.Tensor:
        """``routes``: the (B, T) coefficients of every routed group (None unless ``uses_routing``);
        ``expert``: the index of the batch's own task among the experts (-1 when not known)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is minimised, in words, for the record."""
        return self.summary


OBJECTIVES: Registry[Objective] = Registry("objective", "--objective", Objective)

__all__ = ["OBJECTIVES", "Objective"]
