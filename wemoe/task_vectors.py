"""Task vectors: tau_i = theta_i - theta_0, formed one tensor at a time.

Computed in float32 (or float64 for float64 inputs) so that low-precision
checkpoints do not lose the small differences fine-tuning makes.
"""

from __future__ import annotations

import torch

from wemoe.merge.inputs import MergeInputs


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def base_tensor(inputs: MergeInputs, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    t = inputs.base.get(key)
    return t.to(device=device, dtype=compute_dtype(t.dtype)) if t.is_floating_point() else t


def task_vectors(inputs: MergeInputs, key: str, base: torch.Tensor, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """tau_i for every task, for one canonical tensor; zero where a task took it from the base."""
    out = []
    for task in inputs.tasks:
        if key in task.from_base:
            out.append(torch.zeros_like(base))
        else:
            out.append(task.checkpoint.get(key).to(device=device, dtype=base.dtype) - base)
    return out
