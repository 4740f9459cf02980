"""``wemoe eval``: per-task accuracy table and JSON report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from wemoe.artifact import require_output
from wemoe.config import check_unique, split_named
from wemoe.data import check_labels, load_data
from wemoe.errors import WemoeError
from wemoe.evaluate import evaluate_task
from wemoe.heads import CLIP_SOURCE, is_clip_source, load_head
from wemoe.loading import load_for_inference
from wemoe.model_card import write_card
from wemoe.options import progress_enabled
from wemoe.runtime import resolve_device
from wemoe.zeroshot import ZeroShotHeads


def check_report_path(path: str | Path) -> None:
    """Refuse a report path that cannot be written before any compute."""
    p = Path(path)
    if p.is_dir():
        raise WemoeError("report path is a directory", path=p)
    if not p.resolve().parent.is_dir():
        raise WemoeError("report's parent directory does not exist", path=p)


def parse_task_spec(spec: str) -> tuple[str, str | None, str]:
    """``NAME=HEAD:DATA``, ``NAME=:DATA``, ``NAME=DATA`` or ``DATA`` -> (name, head or None, data).

    HEAD runs to the first colon; a head written ``clip:CLIP`` (zero-shot, from a full CLIP
    checkpoint and the data's class names) keeps its prefix: ``NAME=clip:CLIP:DATA``.
    """
    if "=" in spec:
        name, rest = spec.split("=", 1)
        if not name:
            raise WemoeError(f"empty task name in '{spec}'")
    else:
        name, rest = "", spec
    prefix = CLIP_SOURCE if is_clip_source(rest) else ""
    body = rest[len(prefix) :]
    if ":" in body:
        head, data = body.split(":", 1)
        head = prefix + head if head or prefix else None
    elif prefix:
        raise WemoeError(f"'{spec}': a {CLIP_SOURCE} head is written NAME={CLIP_SOURCE}CLIP_CHECKPOINT:DATA")
    else:
        head, data = None, body
    return name or split_named(data)[0], head, data


def run_eval(opts: dict[str, Any]) -> None:
    if not opts.get("model"):
        raise click.UsageError("missing MODEL (or a --config that names it)")
    specs = [parse_task_spec(s) for s in opts.get("tasks") or ()]
    if not specs:
        raise click.UsageError("no --task given (NAME=HEAD:DATA)")
    check_unique([s[0] for s in specs])
    if opts.get("json_path"):
        check_report_path(opts["json_path"])
    record = require_output(opts["model"]) if opts.get("card") else None
    device = resolve_device(opts.get("device") or "auto")
    progress = progress_enabled(opts)
    loaded = load_for_inference(opts["model"], opts.get("arch"), device)
    zero_shot = ZeroShotHeads(opts.get("arch"), device, progress)
    # validate every task (head, data, sizes) before evaluating any
    jobs = []
    for name, head_path, data_path in specs:
        zero_shot_head = is_clip_source(head_path)
        if head_path and not zero_shot_head:
            head = load_head(head_path)
        elif not head_path and name in loaded.heads:
            head = loaded.heads[name]
        elif not head_path:
            stored = ", ".join(sorted(loaded.heads)) or "none"
            raise WemoeError(f"unknown task '{name}': no head given and the model stores heads for: {stored}")
        data = load_data(data_path, opts.get("split") or "test").subset(opts.get("limit"))
        if zero_shot_head:  # built from the data's class names
            head = zero_shot.head(str(head_path), name, data.classes, data_path)
        head.check_features(loaded.arch.output_dim, name)
        check_labels(data, head.num_classes, name)
        jobs.append((name, head, data, data_path))
    started = time.perf_counter()
    results = {}
    for name, head, data, _ in jobs:
        results[name] = evaluate_task(loaded.module, head, data, loaded.arch, opts.get("batch_size") or 64, device, progress, desc=name)
    average = sum(r.accuracy for r in results.values()) / len(results)
    width = max(8, *(len(n) for n in results))
    lines = [f"{'task':<{width}}  {'accuracy':>8}  {'loss':>7}  {'n':>6}"]
    for name, r in results.items():
        lines.append(f"{name:<{width}}  {100 * r.accuracy:>7.2f}%  {r.loss:>7.4f}  {r.n:>6}")
    lines.append(f"{'average':<{width}}  {100 * average:>7.2f}%")
    click.echo("\n".join(lines))
    if opts.get("json_path"):
        report: dict[str, Any] = {n: {"accuracy": r.accuracy, "n": r.n, "loss": r.loss} for n, r in results.items()}
        report.update({"average": average, "model": str(opts["model"]), "seconds": round(time.perf_counter() - started, 3)})
        Path(opts["json_path"]).write_text(json.dumps(report, indent=2) + "\n")
    if opts.get("card"):
        accuracy = {n: {"accuracy": r.accuracy, "n": r.n, "data": str(job[3])} for (n, r), job in zip(results.items(), jobs)}
        write_card(record.path, record.raw, accuracy)
