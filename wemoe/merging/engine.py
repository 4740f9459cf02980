"""The streaming engine that writes a plain merge: one tensor at a time, in the base's own key scheme.

Memory stays near one tensor per input plus the output tensor being written:
inputs are memory-mapped and released after each read, and output tensors go
straight to disk.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm

from wemoe.checkpoints.inputs import MergeInputs
from wemoe.checkpoints.task_vectors import base_tensor, iter_task_vectors
from wemoe.io.output import Entry
from wemoe.methods.registry import TensorMerge


def output_dtype(requested: torch.dtype | None, original: torch.dtype) -> torch.dtype:
    return requested if (requested is not None and original.is_floating_point) else original


def native_entries(inputs: MergeInputs, dtype: torch.dtype | None) -> list[Entry]:
    """The output's tensors in the base's own layout: names, dtypes, shapes."""
    base = inputs.base
    scheme = base.match.scheme
    entries: list[Entry] = []
    for key in base.keys():
        dt = output_dtype(dtype, base.dtype(key))
        for name, shape in scheme.native_shapes(key, base.shape(key), base.prefix).items():
            entries.append((name, dt, shape))
    for name in base.extras():
        entries.append((name, base.source.dtype(name), base.source.shape(name)))
    return entries


def merged_tensors(
    inputs: MergeInputs, fn: TensorMerge, dtype: torch.dtype | None, device: str = "cpu", progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged tensors in the base's layout, one at a time, in ``native_entries`` order."""
    base = inputs.base
    scheme = base.match.scheme
    for key in tqdm(base.keys(), desc="merging", unit="tensor", disable=not progress):
        b = base_tensor(inputs, key, device)
        if b.is_floating_point():
            merged = fn(key, b, iter_task_vectors(inputs, key, b, device))
            merged = merged.to(device="cpu", dtype=output_dtype(dtype, base.dtype(key)))
        else:
            merged = b
        yield from scheme.to_native(key, merged, base.prefix).items()
    for name in base.extras():
        yield name, base.get_extra(name)


__all__ = ["merged_tensors", "native_entries", "output_dtype"]
