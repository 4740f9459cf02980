"""Models ready for inference: ``wemoe.load`` for wemoe outputs, and any checkpoint for ``wemoe eval``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from wemoe.checkpoints.checkpoint import open_checkpoint
from wemoe.core.arch import ViTArch
from wemoe.model.heads import Head, load_heads
from wemoe.model.vit import VisionTransformer, build_vit
from wemoe.outputs.artifact import OutputRecord, read_output, require_output
from wemoe.outputs.moe_module import load_wemoe


def _load_plain(record: OutputRecord, device: str | torch.device) -> VisionTransformer:
    ckpt = open_checkpoint(record.path)
    model = build_vit(ckpt.arch, ckpt.state_dict())
    model.task_names = list(record.tasks)
    if record.heads_path is not None:
        model.heads = load_heads(record.heads_path)
    return model.to(device)


def load_output(path: str | Path, device: str | torch.device = "cpu") -> VisionTransformer:
    """A wemoe output directory as a module: WEMoE models rebuilt, static merges as a plain ViT.

    Either way ``model(images)`` gives the image embedding and ``model.logits(images, task)``
    uses the stored head of ``task``.
    """
    record = require_output(path)
    if record.is_moe:
        return load_wemoe(record, device=device)
    return _load_plain(record, device)


@dataclass
class LoadedModel:
    module: nn.Module
    arch: ViTArch
    heads: dict[str, Head]
    kind: str


def load_for_inference(path: str | Path, arch: str | None = None, device: str = "cpu") -> LoadedModel:
    """Any checkpoint wemoe reads, or a wemoe output directory (with its stored heads)."""
    record = read_output(path)
    if record is not None and record.is_moe:
        model = load_wemoe(record, device=device)
        return LoadedModel(model, model.arch, model.heads, record.method)
    heads: dict[str, Head] = {}
    if record is not None and record.heads_path is not None:
        heads = load_heads(record.heads_path)
    ckpt = open_checkpoint(path, arch)
    module = build_vit(ckpt.arch, ckpt.state_dict()).to(device)
    return LoadedModel(module, ckpt.arch, heads, ckpt.scheme)
