"""``wemoe export``: bake one task's mean routing into a plain ViT checkpoint,
written in the base's own key scheme so timm / open_clip / transformers load it directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from wemoe.artifact import format_version, require_output, write_output
from wemoe.data import load_data
from wemoe.errors import WemoeError
from wemoe.io.hf_config import own_model_config
from wemoe.io.output import AtomicDirectory, check_destination
from wemoe.model.wemoe_model import WEMoEModel
from wemoe.options import echo_note, progress_enabled
from wemoe.routing_report import mean_routing
from wemoe.runtime import resolve_device
from wemoe.saved import load_wemoe
from wemoe.schemes import get_scheme

# what an export keeps of its source's record: enough to read it as a checkpoint and trace it
KEPT = ("format", "format_version", "architecture", "scheme", "prefix", "activation", "dtype", "versions")


def plain_state(model: WEMoEModel, coefs: np.ndarray) -> dict[str, torch.Tensor]:
    """The canonical state of a plain ViT: every routed linear merged with its group's coefficients."""
    state = {k: v for k, v in model.state_dict().items() if ".experts." not in k and ".routers." not in k}
    for row, (b, group) in zip(coefs, model.spec.routes()):
        for name, linear in model.blocks[b].routed_linears(group).items():
            weight, bias = linear.merged(torch.from_numpy(np.asarray(row)))
            state[f"blocks.{b}.{group}.{name}.weight"], state[f"blocks.{b}.{group}.{name}.bias"] = weight, bias
    return state


def run_export(opts: dict[str, Any]) -> None:
    check_destination(opts["out"], bool(opts.get("force")))
    record = require_output(opts["model"], moe=True)
    device = resolve_device(opts.get("device") or "auto")
    model = load_wemoe(record, device=device)
    task = opts["task"]
    if task not in model.task_names:
        raise WemoeError(f"unknown task '{task}' (experts: {', '.join(model.task_names)})")
    recorded = record.section("wemoe").get("adaptation", {}).get("data", {}).get(task) or {}
    data_path = opts.get("data") or recorded.get("path")
    if not data_path:
        raise WemoeError(f"no data for task '{task}': give --data (none was recorded at merge time)")
    data = load_data(data_path, opts.get("split") or "test").subset(opts.get("limit"))
    coefs = mean_routing(model, data, 64, device, progress_enabled(opts), desc=task)  # (routes, T)
    state = plain_state(model.to("cpu"), coefs)
    scheme = get_scheme(record.scheme)
    native: dict[str, torch.Tensor] = {}
    for key in list(state):
        native.update(scheme.to_native(key, state[key].contiguous(), record.prefix))
    dtype = record.torch_dtype
    native = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in native.items()}
    config = {k: record.raw[k] for k in KEPT if k in record.raw}
    config.update(
        {
            "format_version": format_version("wemoe-export"),
            "method": "wemoe-export",
            "parameters": {"task": task, "mean_routing": coefs.tolist(), "routing_order": model.route_labels(), "data": str(data_path), "images": len(data)},
            "tasks": [task],
            "source": str(Path(opts["model"])),
        }
    )
    heads = {task: model.heads[task]} if task in model.heads else None
    model_config = own_model_config(record.scheme, record.raw.get("model_config"), record.architecture, dtype)
    with AtomicDirectory(opts["out"], bool(opts.get("force"))) as tmp:
        entries = [(k, v.dtype, tuple(v.shape)) for k, v in native.items()]
        write_output(tmp, config, entries, lambda: iter(native.items()), heads=heads, model_config=model_config)
    echo_note(opts, f"wrote {opts['out']} (plain {record.scheme} checkpoint for task '{task}')")
