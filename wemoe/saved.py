"""The standalone WEMoE checkpoint: one directory that rebuilds the merged model
without any source checkpoint, network, or transformers.

Layout: ``model.safetensors`` (or shards + index) with every tensor of the
module (task-arithmetic weights, pretrained MLPs, task vectors, routers),
``heads.safetensors``, ``config.json`` (everything needed to rebuild the module;
the same JSON is in the safetensors header), ``report.json`` (timings, loss
curve: the one file that differs between identical runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from wemoe.arch import ViTArch
from wemoe.errors import WemoeError
from wemoe.heads import load_heads, save_heads
from wemoe.io.output import CONFIG_FILE, config_metadata, write_json, write_model
from wemoe.io.sources import open_source
from wemoe.model.wemoe_model import WEMoEModel


def write_wemoe(directory: Path, model: WEMoEModel, config: dict[str, Any], dtype: torch.dtype | None, shard_size: int | None) -> list[str]:
    """Write the module's state and heads into ``directory`` (a temporary one)."""
    state = model.state_dict()

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if (dtype is not None and t.is_floating_point()) else t

    entries = [(k, cast(v).dtype, tuple(v.shape)) for k, v in state.items()]
    files = write_model(directory, entries, lambda: ((k, cast(v).contiguous()) for k, v in state.items()), config_metadata(config), shard_size)
    if model.heads:
        save_heads(directory / "heads.safetensors", model.heads)
    write_json(directory / CONFIG_FILE, config)
    return files


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise WemoeError("not a wemoe output directory (no config.json)", path=path)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WemoeError(f"cannot read config.json ({exc})", path=path) from None
    if cfg.get("format") != "wemoe" or cfg.get("method") != "wemoe":
        raise WemoeError("config.json does not describe a WEMoE model (static merges load as plain checkpoints)", path=path)
    if int(cfg.get("format_version", 0)) > 1:
        raise WemoeError(f"format version {cfg['format_version']} is newer than this wemoe understands; upgrade wemoe", path=path)
    return cfg


def load_merged(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WEMoEModel:
    """Rebuild a WEMoE model from its directory (``wemoe.load``)."""
    path = Path(path)
    cfg = _read_config(path)
    arch = ViTArch.from_dict(cfg["architecture"], source="wemoe config.json")
    moe = cfg["wemoe"]
    source = open_source(path)
    state = {k: source.get(k) for k in source.keys()}
    coef_range = tuple(moe["coef_range"]) if moe.get("coef_range") else None
    model = WEMoEModel(arch, cfg["tasks"], moe["moe_blocks"], moe["router_layers"], moe["lambda"], coef_range, head_bias="head.bias" in state)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WemoeError(f"model.safetensors does not match config.json ({str(exc).splitlines()[0]})", path=path) from None
    if (path / "heads.safetensors").is_file():
        model.heads = load_heads(path / "heads.safetensors")
    return model.freeze_backbone().to(device).eval()


def describe_merged(path: Path, cfg: dict[str, Any]) -> str:
    moe = cfg.get("wemoe", {})
    a = cfg["architecture"]
    lines = [
        f"path:          {path}",
        "method:        wemoe (weight-ensembling MoE)",
        f"architecture:  width {a['width']}, depth {a['depth']}, heads {a['heads']}, patch {a['patch_size']}, image {a['image_size']}, activation {a['activation']}",
        f"base scheme:   {cfg.get('scheme')}",
        f"tasks:         {', '.join(cfg['tasks'])}",
        f"moe blocks:    {moe.get('moe_blocks')}  router layers {moe.get('router_layers')}  lambda {moe.get('lambda')}  coef range {moe.get('coef_range')}",
        f"adaptation:    {moe.get('adaptation')}",
        f"dtype:         {cfg.get('dtype')}",
    ]
    return "\n".join(lines)
