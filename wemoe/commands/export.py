"""``wemoe export``: bake one task's mean routing into a plain ViT checkpoint,
written in the base's own key scheme so timm / open_clip / transformers load it directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wemoe.commands.options import echo_note, progress_enabled
from wemoe.core.runtime import resolve_device
from wemoe.data import load_data
from wemoe.errors import UsageError
from wemoe.evaluation.routing import mean_routing
from wemoe.io.output import AtomicDirectory, check_destination, input_paths
from wemoe.outputs.artifact import format_version, require_output, write_output
from wemoe.outputs.hf_config import own_model_config
from wemoe.outputs.layout import MOE_SECTION
from wemoe.outputs.model_card import EXPORT_SUMMARY
from wemoe.outputs.moe_module import load_wemoe
from wemoe.schemes import get_scheme

# what an export keeps of its source's record: enough to read it as a checkpoint and trace it
KEPT = ("format", "format_version", "architecture", "scheme", "prefix", "activation", "dtype", "versions")


def run_export(opts: dict[str, Any]) -> None:
    inputs = input_paths(opts["model"], opts.get("data"))
    check_destination(opts["out"], bool(opts.get("force")), inputs)
    record = require_output(opts["model"], moe=True)
    device = resolve_device(opts.get("device") or "auto")
    model = load_wemoe(record, device=device)
    task = opts["task"]
    if task not in model.task_names:
        raise UsageError(f"unknown task '{task}' (experts: {', '.join(model.task_names)})")
    recorded = record.section(MOE_SECTION).get("adaptation", {}).get("data", {}).get(task) or {}
    data_path = opts.get("data") or recorded.get("path")
    if not data_path:
        raise UsageError(f"no data for task '{task}': give --data (none was recorded at merge time)")
    data = load_data(data_path, opts.get("split") or "test").subset(opts.get("limit"))
    coefs = mean_routing(model, data, 64, device, progress_enabled(opts), desc=task)  # (routes, T)
    state = model.to("cpu").plain_state(coefs)
    scheme = get_scheme(record.scheme)
    native: dict[str, torch.Tensor] = {}
    for key in list(state):
        native.update(scheme.to_native(key, state[key].contiguous(), record.prefix))
    dtype = record.torch_dtype
    native = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in native.items()}
    config = {k: record.raw[k] for k in KEPT if k in record.raw}
    config.update(
        {
            "format_version": format_version("plain"),
            "method": "wemoe-export",
            "parameters": {"task": task, "mean_routing": coefs.tolist(), "routing_order": model.route_labels(), "data": str(data_path), "images": len(data)},
            "tasks": [task],
            "source": str(Path(opts["model"])),
        }
    )
    heads = {task: model.heads[task]} if task in model.heads else None
    model_config = own_model_config(record.scheme, record.raw.get("model_config"), record.architecture, dtype)
    with AtomicDirectory(opts["out"], bool(opts.get("force")), input_paths(opts["model"], data_path)) as tmp:
        entries = [(k, v.dtype, tuple(v.shape)) for k, v in native.items()]
        write_output(tmp, config, entries, lambda: iter(native.items()), heads=heads, model_config=model_config, summary=EXPORT_SUMMARY)
    echo_note(opts, f"wrote {opts['out']} (plain {record.scheme} checkpoint for task '{task}')")
