"""``wemoe merge --method wemoe``: upscale, adapt the routers, write one checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import torch

from wemoe.data import TaskData, check_labels, load_data
from wemoe.errors import WemoeError
from wemoe.heads import Head
from wemoe.io.output import AtomicDirectory, write_json
from wemoe.merge.inputs import MergeInputs, per_task_paths, sha256_files
from wemoe.model.wemoe_model import parse_moe_blocks
from wemoe.options import echo_note
from wemoe.provenance import base_config

DEFAULTS = {"lam": 0.3, "steps": 1000, "lr": 1e-4, "batch_size": 16, "router_layers": 2, "coef_range": "0,1", "split": "test"}


def parse_coef_range(spec: str | None) -> tuple[float, float] | None:
    if spec is None or str(spec).lower() in ("none", ""):
        return None
    try:
        lo, hi = (float(v) for v in str(spec).split(","))
    except ValueError:
        raise WemoeError(f"--coef-range must be LO,HI (e.g. 0,1) or none, got '{spec}'") from None
    if not lo < hi:
        raise WemoeError(f"--coef-range needs LO < HI, got '{spec}'")
    return lo, hi


def _file_digest(path: str) -> str:
    p = Path(path)
    return "directory" if p.is_dir() else sha256_files([p])


def load_adaptation_data(specs, task_names: list[str], heads: dict[str, Head], split: str) -> dict[str, tuple[TaskData, str]]:
    data: dict[str, tuple[TaskData, str]] = {}
    for name, path in per_task_paths(specs, task_names, "--data").items():
        if name not in heads:
            raise WemoeError(f"--data for task '{name}' needs its head (--heads {name}=PATH)")
        task_data = load_data(path, split)
        if (task_data.labels >= 0).all():  # labels are not used to adapt, but must fit the head they come with
            check_labels(task_data, heads[name].num_classes, name)
        data[name] = (task_data, path)
    return data


def run_wemoe_merge(opts: dict[str, Any], inputs: MergeInputs, heads: dict[str, Head], device: str, dtype, shard_size: int, progress: bool) -> None:
    from wemoe.adapt import adapt_routers
    from wemoe.saved import write_wemoe
    from wemoe.upscale import build_wemoe

    o = {k: (opts.get(k) if opts.get(k) is not None else v) for k, v in DEFAULTS.items()}
    arch = inputs.base.arch
    blocks = parse_moe_blocks(opts.get("moe_blocks"), arch.depth)
    coef_range = parse_coef_range(o["coef_range"])
    data = load_adaptation_data(opts.get("data") or (), inputs.task_names, heads, o["split"])
    steps = o["steps"] if data else 0
    if opts.get("dry_run"):
        click.echo("\n".join([
            "plan (dry run, nothing written):",
            f"  base:    {inputs.base.path} [{inputs.base.scheme}] width {arch.width} depth {arch.depth} activation {arch.activation}",
            *[f"  task:    {t.name} = {t.path}" + (f"  data {data[t.name][1]} ({len(data[t.name][0])} images)" if t.name in data else "") for t in inputs.tasks],
            f"  method:  wemoe lambda={o['lam']} moe blocks {blocks} router layers {o['router_layers']} coef range {coef_range}",
            f"  adapt:   {steps} steps, lr {o['lr']}, {o['batch_size']} images/task/step, cosine {bool(opts.get('cosine'))}",
            f"  output:  {opts.get('out')}",
        ]))
        return
    if not data:
        echo_note(opts, "warning: no --data given: the routers stay untrained and the model is close to task arithmetic")
    missing = [t for t in inputs.task_names if t not in heads]
    if missing:
        echo_note(opts, f"note: no head for task(s) {', '.join(missing)}: model.logits() will not serve them")
    started = time.perf_counter()
    model = build_wemoe(inputs, o["lam"], blocks, o["router_layers"], coef_range, seed=opts.get("seed") or 0, progress=progress)
    model.heads = dict(heads)
    build_seconds = time.perf_counter() - started
    result = None
    if data:
        model.to(device)
        result = adapt_routers(
            model, heads, {t: d for t, (d, _) in data.items()}, steps=steps, lr=o["lr"], batch_size=o["batch_size"],
            cosine=bool(opts.get("cosine")), seed=opts.get("seed") or 0, device=device, progress=progress,
        )
        model.to("cpu")
        for w in result.warnings:
            click.echo(f"wemoe: warning: {w}", err=True)  # shown even with --quiet
    out_dtype = dtype or torch.float32
    config = base_config(inputs, "wemoe", {"lambda": o["lam"]}, out_dtype, opts.get("seed") or 0)
    config["notes"] = inputs.notes
    config["heads"] = sorted(heads)
    config["wemoe"] = {
        "lambda": o["lam"],
        "moe_blocks": blocks,
        "router_layers": o["router_layers"],
        "router_init_std": 0.01,
        "coef_range": list(coef_range) if coef_range else None,
        "experts": inputs.task_names,
        "adaptation": {
            "data": {t: {"path": str(p), "sha256": _file_digest(p), "split": o["split"], "images": len(d)} for t, (d, p) in data.items()},
            "steps": steps,
            "lr": o["lr"],
            "batch_size": o["batch_size"],
            "cosine": bool(opts.get("cosine")),
            "objective": "sum over tasks of mean prediction entropy",
            "initial_loss": result.initial_loss if result else None,
            "final_loss": result.final_loss if result else None,
            "diagnostics": result.diagnostics if result else None,
            "warnings": result.warnings if result else [],
        },
    }
    with AtomicDirectory(opts["out"], bool(opts.get("force"))) as tmp:
        files = write_wemoe(tmp, model, config, out_dtype, shard_size)
        write_json(tmp / "report.json", {
            "files": files,
            "seconds": {"build": round(build_seconds, 3), "adapt": round(result.seconds, 3) if result else 0.0, "total": round(time.perf_counter() - started, 3)},
            "device": device,
            "loss_curve": [round(v, 6) for v in result.losses] if result else [],
        })
    echo_note(opts, f"wrote {opts['out']} (wemoe, {len(inputs.tasks)} experts, {len(blocks)} MoE blocks, {steps} adaptation steps, {time.perf_counter() - started:.1f} s)")
