"""``entropy`` (the paper's): the mean Shannon entropy of each task's predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wemoe.adaptation.objectives.base import OBJECTIVES, Objective


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the batch."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@OBJECTIVES.register
class Entropy(Objective):
    name = "entropy"
    summary = "sum over tasks of mean prediction entropy"

    def loss(self, logits: torch.Tensor, routes: list[torch.Tensor] | None, expert: int) -> torch.Tensor:
        return entropy(logits)


__all__ = ["Entropy", "entropy"]
