"""Running a merge: validate everything, print the plan or run the method into an atomic output.

``run_merge(config)`` is what ``wemoe merge`` and ``wemoe.merge`` both call. The
order is fixed for every method: options, inputs (keys, shapes, dtypes, finite
values), heads, the method's own checks (data, parameters against the
architecture), and only then compute, into a temporary directory renamed into
place on success.

Under torchrun every rank runs this too (``wemoe.distributed``): the checks are agreed
(a failure on any rank stops all), rank 0 alone prints and writes the output, and the
other ranks only share the adaptation.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from wemoe import distributed
from wemoe.config import MergeConfig, TaskSpec
from wemoe.data import read_classes
from wemoe.errors import UsageError, WemoeError
from wemoe.heads import CLIP_SOURCE, Head, is_clip_source, load_head
from wemoe.io.output import AtomicDirectory, check_destination, parse_size
from wemoe.merging.inputs import MergeInputs, load_inputs
from wemoe.methods import MergeMethod, get_method, params_record
from wemoe.provenance import base_config
from wemoe.runtime import parse_dtype, resolve_device
from wemoe.zeroshot import ZeroShotHeads


@dataclass
class MergeJob:
    """Everything a method needs, validated: the config, opened inputs, heads, device."""

    config: MergeConfig
    method: MergeMethod
    inputs: MergeInputs
    heads: dict[str, Head]
    device: str
    dtype: torch.dtype | None
    shard_size: int
    started: float = field(default_factory=time.perf_counter)
    state: dict[str, Any] = field(default_factory=dict)  # what prepare() loaded for run()
    writes: bool = True  # False on torchrun ranks other than 0: adapt, then return without writing

    @property
    def params(self) -> Any:
        return self.config.params

    @property
    def progress(self) -> bool:
        return not self.config.quiet

    @property
    def seed(self) -> int:
        return self.config.seed

    def note(self, message: str) -> None:
        if not self.config.quiet:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        click.echo(f"wemoe: warning: {message}", err=True)  # shown even with --quiet

    def record(self, dtype: torch.dtype) -> dict[str, Any]:
        """The config.json every output starts from: inputs with hashes, parameters, versions."""
        config = base_config(self.inputs, self.config.method, params_record(self.params), dtype, self.seed)
        config["notes"] = self.inputs.notes
        config["heads"] = sorted(self.heads)
        return config


def load_task_heads(
    tasks: Sequence[TaskSpec],
    feature_dim: int,
    split: str = "test",
    arch: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Head]:
    """Heads per task (files, or ``clip:PATH`` built from the task data's class names), validated against the encoder's output size."""
    heads: dict[str, Head] = {}
    zero_shot: ZeroShotHeads | None = None
    for task in tasks:
        if not task.head:
            continue
        if is_clip_source(task.head):
            if not task.data:  # merge_config refuses this first; direct callers get the same line
                raise WemoeError(f"--heads {task.name}={task.head}: {CLIP_SOURCE} heads take the class names from the task's data (--data)")
            zero_shot = zero_shot or ZeroShotHeads(arch, device, progress)
            head = zero_shot.head(task.head, task.name, read_classes(task.data, split), task.data)
        else:
            head = load_head(task.head)
        head.check_features(feature_dim, task.name)
        heads[task.name] = head
    return heads


def prepare_job(config: MergeConfig) -> MergeJob:
    """Validate and open everything the merge needs; nothing is computed or written."""
    if not config.base:
        raise UsageError("missing --base (or a --config that names it)")
    if not config.out and not config.dry_run:
        raise UsageError("missing --out (or a --config that names it)")
    method = get_method(config.method)()
    device = resolve_device(config.device)
    dtype = parse_dtype(config.dtype)
    shard_size = parse_size(config.shard_size)
    if config.out and not config.dry_run and distributed.current().main:  # only rank 0 writes
        check_destination(config.out, config.force)
    inputs = load_inputs(config.base, [(t.name, t.checkpoint) for t in config.tasks], arch=config.arch, progress=not config.quiet)
    job = MergeJob(config, method, inputs, {}, device, dtype, shard_size)
    for note in inputs.notes:
        job.note(f"note: {note}")
    split = getattr(config.params, "split", "test")
    job.heads = load_task_heads(config.tasks, inputs.base.arch.output_dim, split, config.arch, device, not config.quiet)
    method.prepare(job)
    return job


def plan(job: MergeJob) -> str:
    base = job.inputs.base
    lines = [
        "plan (dry run, nothing written):",
        f"  base:    {base.path} [{base.scheme}] {base.arch.summary()}",
    ]
    for t in job.inputs.tasks:
        head = f"  head {job.config.tasks[job.inputs.task_names.index(t.name)].head}" if t.name in job.heads else ""
        lines.append(f"  task:    {t.name} = {t.path} [{t.checkpoint.scheme}]{head}")
    params = ", ".join(f"{k}={v}" for k, v in params_record(job.params).items())
    lines.append(f"  method:  {job.config.method}" + (f" ({params})" if params else ""))
    lines.extend(f"  {line}" for line in job.method.plan(job))
    lines.append(f"  dtype:   {job.config.dtype or 'as base'}")
    lines.append(f"  output:  {job.config.out or '(none given)'}")
    return "\n".join(lines)


def _prepare_on(world: distributed.World, config: MergeConfig) -> MergeJob:
    job = prepare_job(config)
    job.device = world.device(job.device)
    job.writes = world.main
    return job


def run_merge(config: MergeConfig) -> Path | None:
    """Merge as configured; returns the output directory (None for a dry run, and on torchrun ranks other than 0)."""
    with distributed.session(config.device) as world:
        if not world.main:
            config = dataclasses.replace(config, quiet=True)  # rank 0 alone prints progress and notes
        job = world.agree(lambda: _prepare_on(world, config))
        if config.dry_run:
            if world.main:
                click.echo(plan(job))
            return None
        assert config.out is not None
        if not world.main:
            if job.method.adapts:  # the others' share of the adaptation; a method unaware of job.writes writes to scratch
                with tempfile.TemporaryDirectory(prefix="wemoe-rank-") as scratch:
                    job.method.run(job, Path(scratch))
            return None
        if world.size > 1 and not job.method.adapts:
            job.note(f"note: --method {config.method} does not adapt: rank 0 merges alone")
        with AtomicDirectory(config.out, config.force) as tmp:
            summary = job.method.run(job, tmp)
        job.note(f"wrote {config.out} ({summary}, {time.perf_counter() - job.started:.1f} s)")
        return Path(config.out)


__all__ = ["MergeJob", "load_task_heads", "plan", "prepare_job", "run_merge"]
