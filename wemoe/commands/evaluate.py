"""``wemoe eval``: per-task accuracy table and JSON report."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from wemoe.clip.zeroshot import CLIP_SOURCE, ZeroShotHeads, is_clip_source
from wemoe.commands.options import progress_enabled
from wemoe.core.runtime import resolve_device
from wemoe.core.tasks import check_unique, split_named
from wemoe.data import check_labels, load_data
from wemoe.errors import UsageError, WemoeError
from wemoe.evaluation.accuracy import evaluate_task
from wemoe.evaluation.task_agnostic import AgnosticResult, evaluate_task_agnostic
from wemoe.io.output import check_not_input, input_paths
from wemoe.methods import REGISTRY
from wemoe.model.heads import load_head
from wemoe.moe.model import WEMoEModel
from wemoe.outputs.artifact import OutputRecord, require_output
from wemoe.outputs.layout import CARD_FILE
from wemoe.outputs.loading import load_for_inference
from wemoe.outputs.model_card import EXPORT_SUMMARY, write_card


def method_summary(record: OutputRecord) -> str:
    """What the method that wrote ``record`` is, in one line (for its model card)."""
    cls = REGISTRY.get(record.method)
    return cls.summary if cls is not None else EXPORT_SUMMARY


def check_report_path(path: str | Path, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse a report path that cannot be written, or would replace an input, before any compute."""
    p = Path(path)
    check_not_input(p, input_paths(*inputs), file=True)
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
            raise UsageError(f"empty task name in '{spec}'")
    else:
        name, rest = "", spec
    prefix = CLIP_SOURCE if is_clip_source(rest) else ""
    body = rest[len(prefix) :]
    if ":" in body:
        head, data = body.split(":", 1)
        head = prefix + head if head or prefix else None
    elif prefix:
        raise UsageError(f"'{spec}': a {CLIP_SOURCE} head is written NAME={CLIP_SOURCE}CLIP_CHECKPOINT:DATA")
    else:
        head, data = None, body
    if not data:
        raise UsageError(f"--task '{spec}' names no data (NAME=HEAD:DATA)")
    return name or split_named(data)[0], head, data


def run_eval(opts: dict[str, Any]) -> None:
    if not opts.get("model"):
        raise click.UsageError("missing MODEL (or a --config that names it)")
    specs = [parse_task_spec(s) for s in opts.get("tasks") or ()]
    if not specs:
        raise click.UsageError("no --task given (NAME=HEAD:DATA)")
    check_unique([s[0] for s in specs], "task", [s[2] for s in specs])
    if opts.get("json_path"):
        check_report_path(opts["json_path"], [opts["model"], opts.get("arch"), *(p for _, head, data in specs for p in (head, data))])
    record = require_output(opts["model"]) if opts.get("card") else None
    device = resolve_device(opts.get("device") or "auto")
    progress = progress_enabled(opts)
    loaded = load_for_inference(opts["model"], opts.get("arch"), device)
    agnostic = bool(opts.get("task_agnostic"))
    if agnostic:
        check_task_agnostic(loaded.module, opts["model"])
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
            raise UsageError(f"unknown task '{name}': no head given and the model stores heads for: {stored}")
        data = load_data(data_path, opts.get("split") or "test").subset(opts.get("limit"))
        if zero_shot_head:  # built from the data's class names
            head = zero_shot.head(str(head_path), name, data.classes, data_path)
        head.check_features(loaded.arch.output_dim, name)
        check_labels(data, head.num_classes, name)
        jobs.append((name, head, data, data_path))
    started = time.perf_counter()
    results: dict[str, Any] = {}
    batch = opts.get("batch_size") or 64
    for name, head, data, _ in jobs:
        if agnostic:
            results[name] = evaluate_task_agnostic(loaded.module, name, head, data, batch, device, progress, desc=name)
        else:
            results[name] = evaluate_task(loaded.module, head, data, loaded.arch, batch, device, progress, desc=name)
    click.echo(result_table(results, agnostic))
    if opts.get("json_path"):
        report: dict[str, Any] = {n: result_record(r) for n, r in results.items()}
        report.update({"average": mean(r.accuracy for r in results.values()), "model": str(opts["model"]), "seconds": round(time.perf_counter() - started, 3)})
        if agnostic:
            report["task_agnostic"] = {k: mean(getattr(r, k) for r in results.values()) for k in ("task_accuracy", "joint_accuracy")}
        Path(opts["json_path"]).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote the results to {opts['json_path']}", err=True)
    if opts.get("card"):
        accuracy = {n: {**result_record(r), "data": str(job[3])} for (n, r), job in zip(results.items(), jobs)}
        write_card(record.path, record.raw, method_summary(record), accuracy)
        click.echo(f"wrote the accuracies into {record.path / CARD_FILE}", err=True)


def check_task_agnostic(module: Any, path: str) -> None:
    """``--task-agnostic`` needs a model that routes (so has a task posterior) and a head for every merged task."""
    if not isinstance(module, WEMoEModel):
        raise UsageError("--task-agnostic needs a mixture-of-experts output (its routing says which task an image is); this is a plain checkpoint", path=path)
    missing = [t for t in module.task_names if t not in module.heads]
    if missing:
        have = "stores no heads" if not module.heads else f"stores no head for {', '.join(missing)}"
        raise WemoeError(f"--task-agnostic picks each image's head itself, so it needs every merged task's head; this model {have}", path=path)


def mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def result_record(r: Any) -> dict[str, Any]:
    out = {"accuracy": r.accuracy, "n": r.n, "loss": r.loss}
    if isinstance(r, AgnosticResult):
        out.update(task_accuracy=r.task_accuracy, joint_accuracy=r.joint_accuracy, predicted=r.predicted)
    return out


def result_table(results: dict[str, Any], agnostic: bool) -> str:
    width = max(8, *(len(n) for n in results))
    extra = f"  {'task id':>8}  {'joint':>8}" if agnostic else ""
    lines = [f"{'task':<{width}}  {'accuracy':>8}  {'loss':>7}  {'n':>6}{extra}"]
    for name, r in results.items():
        more = f"  {100 * r.task_accuracy:>7.2f}%  {100 * r.joint_accuracy:>7.2f}%" if agnostic else ""
        lines.append(f"{name:<{width}}  {100 * r.accuracy:>7.2f}%  {r.loss:>7.4f}  {r.n:>6}{more}")
    values = list(results.values())
    more = f"  {100 * mean(r.task_accuracy for r in values):>7.2f}%  {100 * mean(r.joint_accuracy for r in values):>7.2f}%" if agnostic else ""
    lines.append(f"{'average':<{width}}  {100 * mean(r.accuracy for r in values):>7.2f}%  {'':>7}  {'':>6}{more}")
    return "\n".join(lines)
