"""The streaming static-merge engine: tensor by tensor, written as it goes.

Memory stays near one tensor per input plus the output tensor being written:
inputs are memory-mapped and released after each read, and output tensors go
straight to disk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from wemoe.heads import save_heads
from wemoe.io.output import CONFIG_FILE, AtomicDirectory, Entry, config_metadata, write_json, write_model
from wemoe.merge.inputs import MergeInputs
from wemoe.merge.static import DEFAULT_LAMBDA, static_method
from wemoe.provenance import base_config
from wemoe.task_vectors import base_tensor, iter_task_vectors


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


def static_merge_tensors(
    inputs: MergeInputs, fn, dtype: torch.dtype | None, device: str = "cpu", progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    base = inputs.base
    scheme = base.match.scheme
    for key in tqdm(base.keys(), desc="merging", unit="tensor", disable=not progress):
        b = base_tensor(inputs, key, device)
        if b.is_floating_point():
            merged = fn(b, iter_task_vectors(inputs, key, b, device))
            merged = merged.to(device="cpu", dtype=output_dtype(dtype, base.dtype(key)))
        else:
            merged = b
        yield from scheme.to_native(key, merged, base.prefix).items()
    for name in base.extras():
        yield name, base.get_extra(name)


def run_static_merge(
    inputs: MergeInputs,
    out: str | Path,
    method: str,
    lam: float | None = None,
    ties_k: float = 20.0,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    shard_size: int | None = None,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    heads: dict | None = None,
) -> Path:
    fn = static_method(method, lam, ties_k)
    params: dict = {}
    if method in ("task-arithmetic", "ties"):
        params["lambda"] = lam if lam is not None else DEFAULT_LAMBDA[method]
    if method == "ties":
        params["ties_k"] = ties_k
    out_dtype = dtype or inputs.base.dtype("blocks.0.mlp.fc1.weight")
    config = base_config(inputs, method, params, out_dtype, seed)
    config["notes"] = inputs.notes
    config["heads"] = sorted(heads) if heads else []
    entries = native_entries(inputs, dtype)
    started = time.perf_counter()
    with AtomicDirectory(out, force) as tmp:
        files = write_model(tmp, entries, lambda: static_merge_tensors(inputs, fn, dtype, device, progress), config_metadata(config), shard_size)
        if heads:
            save_heads(tmp / "heads.safetensors", heads)
        write_json(tmp / CONFIG_FILE, config)
        write_json(tmp / "report.json", {"files": files, "seconds": round(time.perf_counter() - started, 3), "device": device})
    return Path(out)
