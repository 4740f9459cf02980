"""Running a merge: validate everything, print the plan or run the method, and write its result atomically.

``run_merge(config)`` is what ``wemoe merge`` and ``wemoe.merge`` both call. The
order is fixed for every method: options, inputs (keys, shapes, dtypes, finite
values), heads, the method's own checks (data, parameters against the
architecture), and only then compute. The method returns what it produced
(:class:`~wemoe.methods.registry.MethodResult`); this module alone writes it, into a
temporary directory renamed into place on success.

Under torchrun every rank runs this too (``wemoe.adaptation.distributed``): the
checks are agreed (a failure on any rank stops all), rank 0 alone prints and writes
the output, and the other ranks only share the adaptation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from wemoe.adaptation import distributed
from wemoe.checkpoints.inputs import load_inputs
from wemoe.clip.zeroshot import CLIP_SOURCE, ZeroShotHeads, is_clip_source
from wemoe.core.memory import memory_limit
from wemoe.core.runtime import dtype_name, parse_dtype, resolve_device
from wemoe.core.tasks import TaskSpec
from wemoe.data import read_classes
from wemoe.errors import UsageError, WemoeError
from wemoe.io.output import AtomicDirectory, check_destination, input_paths, parse_size
from wemoe.merging.config import MergeConfig
from wemoe.merging.engine import merged_tensors, native_entries
from wemoe.methods import MergeMethod, MethodContext, MethodResult, get_method, params_record
from wemoe.model.heads import Head, load_head
from wemoe.outputs.artifact import MOE_SECTION, write_module, write_output
from wemoe.outputs.hf_config import own_model_config
from wemoe.outputs.provenance import base_config

# what a mixture-of-experts output is stored in when --dtype is not given (plain outputs keep the base's)
MOE_DEFAULT_DTYPE = torch.float32


@dataclass
class MergeJob:
    """A validated merge: the config, the method, what the method is given and what it prepared."""

    config: MergeConfig
    method: MergeMethod
    ctx: MethodContext
    state: Any
    dtype: torch.dtype | None
    shard_size: int
    started: float = field(default_factory=time.perf_counter)

    @property
    def out_dtype(self) -> torch.dtype:
        """What the output is written in: --dtype, else the base's (plain) or float32 (mixture of experts)."""
        if self.dtype is not None:
            return self.dtype
        if self.method.produces == "moe":
            return MOE_DEFAULT_DTYPE
        return self.ctx.inputs.base.dtype("blocks.0.mlp.fc1.weight")

    def record(self) -> dict[str, Any]:
        """The config.json every output starts from: inputs with hashes, parameters, versions."""
        inputs = self.ctx.inputs
        config = base_config(inputs, self.config.method, params_record(self.ctx.params), self.out_dtype, self.config.seed, self.method.produces)
        config["notes"] = inputs.notes
        config["heads"] = sorted(self.ctx.heads)
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
        check_destination(config.out, config.force, input_paths(*config.inputs()))
    inputs = load_inputs(config.base, [(t.name, t.checkpoint) for t in config.tasks], arch=config.arch, progress=not config.quiet)
    ctx = MethodContext(inputs, list(config.tasks), {}, config.params, device, config.seed, config.quiet)
    for note in [*inputs.notes, *inputs.hints]:
        ctx.note(f"note: {note}")
    split = getattr(config.params, "split", "test")
    ctx.heads = load_task_heads(config.tasks, inputs.base.arch.output_dim, split, config.arch, device, not config.quiet)
    check_sizes_fit(config, ctx)
    try:
        state = method.prepare(ctx)
    except WemoeError as exc:
        raise _usage_if_option(exc) from None
    return MergeJob(config, method, ctx, state, dtype, shard_size)


def check_sizes_fit(config: MergeConfig, ctx: MethodContext) -> None:
    """Sizes the user gives must fit in memory: --batch-size 10**14 is refused here, not by the allocator."""
    arch = ctx.inputs.base.arch
    needs = {  # parameter -> bytes its value asks for
        "batch_size": lambda n: n * 3 * arch.image_size**2 * 4,  # one task's preprocessed float32 images per step
        "router_hidden": lambda n: n * (arch.output_dim + arch.width + len(ctx.tasks) + 2) * 4 * 4,  # weights, gradients, Adam state
    }
    have = memory_limit()
    given = params_record(config.params)
    for key, need_of in needs.items():
        value = given.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        need = need_of(value)
        if need > have:
            where = config.origins.get(key, "--" + key.replace("_", "-"))
            raise UsageError(f"{where} {value} needs {need / 2**30:.3g} GiB; this machine can hold {have / 2**30:.3g} GiB")


def finite_output(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors on to the writer, refusing NaN or Inf: nothing is written that wemoe.load would refuse to read."""
    for key, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WemoeError("the result holds NaN or Inf values (did the adaptation diverge? try a lower --lr); nothing was written", tensor=key)
        yield key, tensor


def _usage_if_option(exc: WemoeError) -> WemoeError:
    """A method's refusal that starts with the option it names (``--moe-blocks names block(s) [9]``) is a usage error."""
    text = str(exc)
    return UsageError(text) if text.startswith("--") and not isinstance(exc, UsageError) else exc


def plan(job: MergeJob) -> str:
    base = job.ctx.inputs.base
    lines = [
        "plan (dry run, nothing written):",
        f"  base:    {base.path} [{base.scheme}] {base.arch.summary()}",
    ]
    specs = {t.name: t for t in job.config.tasks}
    for t in job.ctx.inputs.tasks:
        head = f"  head {specs[t.name].head}" if t.name in job.ctx.heads else ""
        lines.append(f"  task:    {t.name} = {t.path} [{t.checkpoint.scheme}]{head}")
    params = ", ".join(f"{k}={v}" for k, v in params_record(job.ctx.params).items())
    lines.append(f"  method:  {job.config.method}" + (f" ({params})" if params else ""))
    lines.extend(f"  {line}" for line in job.method.plan(job.ctx, job.state))
    given = "" if job.dtype is not None else (" (float32 unless --dtype)" if job.method.produces == "moe" else " (the base's)")
    lines.append(f"  dtype:   {dtype_name(job.out_dtype)}{given}")
    lines.append(f"  output:  {job.config.out or '(none given)'}")
    return "\n".join(lines)


def write_result(job: MergeJob, result: MethodResult, directory: Path) -> None:
    """Write what the method produced into ``directory`` (a temporary one): model, heads, record, report, card."""
    inputs, dtype = job.ctx.inputs, job.out_dtype
    config = job.record()
    base = inputs.base
    own = own_model_config(base.scheme, base.source.config, base.arch, dtype)

    def report() -> dict[str, Any]:
        return {"seconds": round(time.perf_counter() - job.started, 3), "device": job.ctx.device, **result.report}

    summary = job.method.summary
    if job.method.produces == "moe":
        if result.module is None:
            raise TypeError(f"method {job.method.name} produces a mixture of experts but returned no module")
        config[MOE_SECTION] = result.section or {}
        if own is not None:  # the base library's config, for the plain checkpoints `wemoe export` writes
            config["model_config"] = own
        state = dict(finite_output(result.module.state_dict().items()))
        write_module(directory, state, config, dtype, job.shard_size, heads=job.ctx.heads, report=report, summary=summary)
        return
    if result.merge is None:
        raise TypeError(f"method {job.method.name} produces a plain checkpoint but returned no tensor merge")
    if result.section is not None:
        config[job.method.name] = result.section
    write_output(
        directory,
        config,
        native_entries(inputs, job.dtype),
        lambda: finite_output(merged_tensors(inputs, result.merge, job.dtype, job.ctx.device, job.ctx.progress)),
        heads=job.ctx.heads,
        report=report,
        shard_size=job.shard_size,
        model_config=own,
        summary=summary,
    )


def _prepare_on(world: distributed.World, config: MergeConfig) -> MergeJob:
    job = prepare_job(config)
    job.ctx.device = world.device(job.ctx.device)
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
            if job.method.adapts:  # the others' share of the adaptation; what they produce is rank 0's to write
                job.method.run(job.ctx, job.state)
            return None
        if world.size > 1 and not job.method.adapts:
            job.ctx.note(f"note: --method {config.method} does not adapt: rank 0 merges alone")
        result = job.method.run(job.ctx, job.state)
        with AtomicDirectory(config.out, config.force, input_paths(*config.inputs())) as tmp:
            write_result(job, result, tmp)
        job.ctx.note(f"wrote {config.out} ({result.summary}, {time.perf_counter() - job.started:.1f} s)")
        return Path(config.out)


__all__ = ["MergeJob", "load_task_heads", "plan", "prepare_job", "run_merge", "write_result"]
