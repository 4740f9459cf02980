"""Objectives of test-time adaptation, one module per kind (``--objective``)."""

from wemoe.adaptation.objectives.base import OBJECTIVES, Objective

# importing a kind's module registers it; this order is the CLI's
from wemoe.adaptation.objectives.entropy import Entropy, entropy  # isort: skip
from wemoe.adaptation.objectives.task import EntropyAndTask, TaskIdentity, task_identity_loss  # isort: skip

__all__ = ["OBJECTIVES", "Entropy", "EntropyAndTask", "Objective", "TaskIdentity", "entropy", "task_identity_loss"]
