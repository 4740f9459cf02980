"""``wemoe export``: bake one task's mean routing into a plain ViT checkpoint,
written in the base's own key scheme so timm / open_clip load it directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from wemoe.data import load_data
from wemoe.errors import WemoeError
from wemoe.heads import save_heads
from wemoe.io.output import CONFIG_FILE, AtomicDirectory, config_metadata, write_json, write_model
from wemoe.options import echo_note, progress_enabled, resolve_device
from wemoe.routing_report import mean_routing
from wemoe.saved import load_merged
from wemoe.schemes import get_scheme


def run_export(opts: dict[str, Any]) -> None:
    from wemoe.io.output import check_destination

    check_destination(opts["out"], bool(opts.get("force")))
    model_dir = Path(opts["model"])
    device = resolve_device(opts.get("device") or "auto")
    model = load_merged(model_dir, device=device)
    cfg = json.loads((model_dir / CONFIG_FILE).read_text())
    task = opts["task"]
    if task not in model.task_names:
        raise WemoeError(f"unknown task '{task}' (experts: {', '.join(model.task_names)})")
    data_path = opts.get("data") or (cfg["wemoe"]["adaptation"]["data"].get(task) or {}).get("path")
    if not data_path:
        raise WemoeError(f"no data for task '{task}': give --data (none was recorded at merge time)")
    data = load_data(data_path, opts.get("split") or "test").subset(opts.get("limit"))
    coefs = mean_routing(model, data, 64, device, progress_enabled(opts), desc=task)  # (blocks, T)
    model = model.to("cpu")
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k or not any(k.startswith(f"blocks.{b}.mlp.") for b in model.moe_blocks)}
    for row, b in zip(coefs, model.moe_blocks):
        for name, t in model.blocks[b].mlp.merged_mlp(torch.from_numpy(row)).items():
            state[f"blocks.{b}.mlp.{name}"] = t
    scheme = get_scheme(cfg["scheme"])
    prefix = cfg.get("prefix", "")
    native: dict[str, torch.Tensor] = {}
    for key in list(state):
        native.update(scheme.to_native(key, state[key].contiguous(), prefix))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.get("dtype", "float32")]
    native = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in native.items()}
    config = {k: cfg[k] for k in ("format", "format_version", "architecture", "scheme", "prefix", "activation", "dtype", "versions") if k in cfg}
    config.update({
        "method": "wemoe-export",
        "parameters": {"task": task, "mean_routing": coefs.tolist(), "moe_blocks": model.moe_blocks, "data": str(data_path), "images": len(data)},
        "tasks": [task],
        "source": str(model_dir),
    })
    with AtomicDirectory(opts["out"], bool(opts.get("force"))) as tmp:
        entries = [(k, v.dtype, tuple(v.shape)) for k, v in native.items()]
        write_model(tmp, entries, lambda: iter(native.items()), config_metadata(config))
        if task in model.heads:
            save_heads(tmp / "heads.safetensors", {task: model.heads[task]})
        write_json(tmp / CONFIG_FILE, config)
    echo_note(opts, f"wrote {opts['out']} (plain {cfg['scheme']} checkpoint for task '{task}')")
