"""``wemoe merge``: validate everything, then run a static merge or build WEMoE."""

from __future__ import annotations

import math
import time
from typing import Any

import click

from wemoe.errors import WemoeError
from wemoe.heads import Head, load_head
from wemoe.io.output import check_destination, parse_size
from wemoe.merge.inputs import load_inputs, parse_named, per_task_paths
from wemoe.options import echo_note, parse_dtype, progress_enabled, resolve_device


def _check_numbers(opts: dict[str, Any]) -> None:
    for key, label in (("lam", "--lambda"), ("lr", "--lr"), ("ties_k", "--ties-k")):
        v = opts.get(key)
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(float(v))):
            raise WemoeError(f"{label} must be a finite number, got {v}")
    if opts.get("steps") is not None and opts["steps"] < 0:
        raise WemoeError(f"--steps must be >= 0, got {opts['steps']}")
    if opts.get("batch_size") is not None and opts["batch_size"] < 1:
        raise WemoeError(f"--batch-size must be >= 1, got {opts['batch_size']}")
    if opts.get("lr") is not None and opts["lr"] <= 0:
        raise WemoeError(f"--lr must be > 0, got {opts['lr']}")


def load_task_heads(specs, task_names: list[str], feature_dim: int) -> dict[str, Head]:
    """``--heads NAME=PATH``: validated against the task list and the encoder's output size."""
    heads: dict[str, Head] = {}
    for name, path in per_task_paths(specs, task_names, "--heads").items():
        head = load_head(path)
        head.check_features(feature_dim, name)
        heads[name] = head
    return heads


def run_merge(opts: dict[str, Any]) -> None:
    method = opts.get("method") or "task-arithmetic"
    if not opts.get("base"):
        raise click.UsageError("missing --base (or a --config that names it)")
    if not opts.get("out") and not opts.get("dry_run"):
        raise click.UsageError("missing --out (or a --config that names it)")
    _check_numbers(opts)
    if method != "wemoe":
        for opt in ("data", "steps", "moe_blocks", "router_layers", "coef_range", "split", "cosine"):
            if opts.get(opt):
                raise click.UsageError(f"--{opt.replace('_', '-')} only applies to --method wemoe")
    device = resolve_device(opts.get("device") or "auto")
    dtype = parse_dtype(opts.get("dtype"))
    shard_size = parse_size(opts.get("shard_size") or "4GB")
    if opts.get("out") and not opts.get("dry_run"):
        check_destination(opts["out"], bool(opts.get("force")))
    tasks = [parse_named(s) for s in opts.get("tasks") or ()]
    progress = progress_enabled(opts)
    started = time.perf_counter()
    inputs = load_inputs(opts["base"], tasks, arch=opts.get("arch"), progress=progress)
    for note in inputs.notes:
        echo_note(opts, f"note: {note}")
    heads = load_task_heads(opts.get("heads") or (), inputs.task_names, inputs.base.arch.output_dim)
    if method == "wemoe":
        from wemoe.commands.wemoe_merge import run_wemoe_merge

        run_wemoe_merge(opts, inputs, heads, device=device, dtype=dtype, shard_size=shard_size, progress=progress)
        return
    if opts.get("dry_run"):
        _print_plan(inputs, method, opts, dtype)
        return
    from wemoe.merge.engine import run_static_merge

    out = run_static_merge(
        inputs,
        opts["out"],
        method,
        lam=opts.get("lam"),
        ties_k=opts.get("ties_k") if opts.get("ties_k") is not None else 20.0,
        dtype=dtype,
        device=device,
        shard_size=shard_size,
        force=bool(opts.get("force")),
        seed=opts.get("seed") or 0,
        progress=progress,
        heads=heads,
    )
    echo_note(opts, f"wrote {out} ({method}, {len(inputs.tasks)} tasks, {time.perf_counter() - started:.1f} s)")


def _print_plan(inputs, method: str, opts: dict[str, Any], dtype) -> None:
    base = inputs.base
    a = base.arch
    lines = [
        "plan (dry run, nothing written):",
        f"  base:    {base.path} [{base.scheme}] width {a.width} depth {a.depth} heads {a.heads} "
        f"patch {a.patch_size} image {a.image_size} activation {a.activation}",
    ]
    for t in inputs.tasks:
        lines.append(f"  task:    {t.name} = {t.path} [{t.checkpoint.scheme}]")
    lines.append(f"  method:  {method}" + (f" lambda={opts['lam']}" if opts.get("lam") is not None else ""))
    lines.append(f"  dtype:   {str(dtype).replace('torch.', '') if dtype else 'as base'}")
    lines.append(f"  output:  {opts.get('out') or '(none given)'}")
    click.echo("\n".join(lines))
