"""``wemoe routes``: mean routing weight per block and expert for each task's data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from wemoe.commands.evaluate import check_report_path, parse_task_spec
from wemoe.commands.options import progress_enabled
from wemoe.core.runtime import resolve_device
from wemoe.core.tasks import check_unique
from wemoe.data import load_data
from wemoe.evaluation.routing import mean_routing, routing_heatmap, routing_table
from wemoe.outputs.artifact import require_output
from wemoe.outputs.moe_module import load_wemoe


def run_routes(opts: dict[str, Any]) -> None:
    specs = [parse_task_spec(s) for s in opts.get("tasks") or ()]
    if not specs:
        raise click.UsageError("no --task given (NAME=DATA)")
    for key in ("png", "json_path"):
        if opts.get(key):
            check_report_path(opts[key], [opts["model"], *(path for _, _, path in specs)])
    device = resolve_device(opts.get("device") or "auto")
    check_unique([s[0] for s in specs], "task", [s[2] for s in specs])
    model = load_wemoe(require_output(opts["model"], moe=True), device=device)
    datasets = {name: load_data(path, opts.get("split") or "test").subset(opts.get("limit")) for name, _head, path in specs}
    means = {n: mean_routing(model, d, opts["batch_size"], device, progress_enabled(opts), desc=n) for n, d in datasets.items()}
    click.echo(routing_table(model, means))
    if opts.get("png"):
        routing_heatmap(model, means, opts["png"])
        click.echo(f"wrote the routing heatmap to {opts['png']}", err=True)
    if opts.get("json_path"):
        report = {
            "experts": model.task_names,
            "blocks": model.moe_blocks,
            "routes": model.route_labels(),
            "mean_routing": {n: m.tolist() for n, m in means.items()},
        }
        Path(opts["json_path"]).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote the mean routing weights to {opts['json_path']}", err=True)
