"""The streaming engine for methods that merge tensor by tensor into a plain checkpoint.

Memory stays near one tensor per input plus the output tensor being written:
inputs are memory-mapped and released after each read, and output tensors go
straight to disk, in the base's own key scheme.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from wemoe.artifact import write_output
from wemoe.io.hf_config import own_model_config
from wemoe.io.output import Entry
from wemoe.merging.inputs import MergeInputs
from wemoe.methods.registry import MergeMethod
from wemoe.task_vectors import base_tensor, iter_task_vectors

# (canonical key, base tensor, task vectors of that tensor) -> merged tensor
TensorMerge = Callable[[str, torch.Tensor, Iterable[torch.Tensor]], torch.Tensor]


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


def write_plain_merge(job, directory: Path, fn: TensorMerge, record_extra: dict | None = None, report_extra: dict | None = None) -> None:
    """Stream ``fn`` over every tensor into ``directory``: model, heads, record, report.json, model card
    (and, for a Hugging Face base, the model's own config.json)."""
    inputs = job.inputs
    out_dtype = job.dtype or inputs.base.dtype("blocks.0.mlp.fc1.weight")
    config = job.record(out_dtype)
    config.update(record_extra or {})
    started = time.perf_counter()
    write_output(
        directory,
        config,
        native_entries(inputs, job.dtype),
        lambda: merged_tensors(inputs, fn, job.dtype, job.device, job.progress),
        heads=job.heads,
        report=lambda: {"seconds": round(time.perf_counter() - started, 3), "device": job.device, **(report_extra or {})},
        shard_size=job.shard_size,
        model_config=own_model_config(inputs.base.scheme, inputs.base.source.config, inputs.base.arch, out_dtype),
    )


class StaticMethod(MergeMethod):
    """A data-free merge: a function of the base tensor and the task vectors, tensor by tensor."""

    def tensor_merge(self, params) -> TensorMerge:
        raise NotImplementedError

    def run(self, job, directory: Path) -> str:
        write_plain_merge(job, directory, self.tensor_merge(job.params))
        return f"{self.name}, {len(job.inputs.tasks)} tasks"
