"""Task vectors: tau_i = theta_i - theta_0, formed one tensor at a time.

Computed in float32 (or float64 for float64 inputs) so that low-precision
checkpoints do not lose the small differences fine-tuning makes. Offered as a
stream (methods that only sum never hold more than one task's tensor) or as one
preallocated stack (methods that need every task at once), never as a list that
is stacked again: the extra copy is what made a static merge's peak memory grow
with the number of tasks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from wemoe.checkpoints.adapters import AdapterCheckpoint
from wemoe.checkpoints.inputs import MergeInputs


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def base_tensor(inputs: MergeInputs, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    t = inputs.base.get(key)
    return t.to(device=device, dtype=compute_dtype(t.dtype)) if t.is_floating_point() else t


def iter_task_vectors(inputs: MergeInputs, key: str, base: torch.Tensor, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """tau_i for every task, one at a time, for one canonical tensor; zero where a task took it from the base."""
    for task in inputs.tasks:
        if key in task.from_base:
            yield torch.zeros_like(base)
        elif isinstance(task.checkpoint, AdapterCheckpoint):  # exact: scale * B @ A, never (base + delta) - base
            yield task.checkpoint.delta(key).to(device=device, dtype=base.dtype)
        else:
            # out of place: a reader may hand back a tensor it keeps (in-memory .pt state dicts)
            yield task.checkpoint.get(key).to(device=device, dtype=base.dtype) - base


def stacked_task_vectors(inputs: MergeInputs, key: str, base: torch.Tensor, device: torch.device | str = "cpu", transposed: bool = False) -> torch.Tensor:
    """All tau_i of one tensor as a (T, *shape) stack, filled in place (no list + stack copy).

    ``transposed`` (2-D tensors): the stack is stored as (T, cols, rows) and returned as
    its (T, rows, cols) view, for consumers that keep the transposed layout (no copy later).
    """
    shape = tuple(reversed(base.shape)) if transposed else tuple(base.shape)
    out = torch.empty((len(inputs.tasks), *shape), dtype=base.dtype, device=device)
    for i, tau in enumerate(iter_task_vectors(inputs, key, base, device)):
        out[i] = tau.t() if transposed else tau
    return out.transpose(1, 2) if transposed else out


class TaskVectorsOf:
    """The task vectors of one canonical tensor, offered as a stream or as one stack (``wemoe.moe.experts.TaskVectors``)."""

    def __init__(self, inputs: MergeInputs, key: str, base: torch.Tensor, device: torch.device | str = "cpu"):
        self.inputs, self.key, self.base, self.device = inputs, key, base, device

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter_task_vectors(self.inputs, self.key, self.base, self.device)

    def stack(self, transposed: bool = False) -> torch.Tensor:
        return stacked_task_vectors(self.inputs, self.key, self.base, self.device, transposed)

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """A LoRA adapter task's own factors of this weight (exact), None for whole checkpoints."""
        return [
            t.checkpoint.factors(self.key) if isinstance(t.checkpoint, AdapterCheckpoint) and self.key not in t.from_base else None for t in self.inputs.tasks
        ]


__all__ = ["TaskVectorsOf", "base_tensor", "compute_dtype", "iter_task_vectors", "stacked_task_vectors"]
