"""Models ready for inference: ``wemoe.load`` for wemoe outputs, and any checkpoint for ``wemoe eval``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from wemoe.checkpoints.checkpoint import Checkpoint, open_checkpoint
from wemoe.core.arch import ViTArch
from wemoe.core.runtime import resolve_device
from wemoe.errors import WemoeError
from wemoe.model.heads import Head
from wemoe.model.vit import VisionTransformer, build_vit
from wemoe.outputs.artifact import OutputRecord, read_output, require_output
from wemoe.outputs.moe_module import load_wemoe
from wemoe.outputs.record_checks import check_finite, check_plain_arch, load_stored_heads


def _stored_heads(record: OutputRecord, feature_dim: int) -> dict[str, Head]:
    return load_stored_heads(record.path, record.tasks, feature_dim) if record.heads_path is not None else {}


def _plain_state(record: OutputRecord, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """A plain output's tensors, once its record agrees with their architecture and they are finite."""
    check_plain_arch(record.architecture, ckpt.arch, ckpt.keys(), record.path)
    state = ckpt.state_dict()
    check_finite(state, record.path)
    return state


def _load_plain(record: OutputRecord, device: str | torch.device) -> VisionTransformer:
    ckpt = open_checkpoint(record.path)
    state = _plain_state(record, ckpt)
    heads = _stored_heads(record, ckpt.arch.output_dim)
    model = build_vit(ckpt.arch, state)
    model.task_names = list(record.tasks)
    if record.heads_path is not None:
        model.heads = heads
    return model.to(device)


def check_device(device: Any) -> str:
    """``device`` of the Python API: cpu, cuda, cuda:N, auto or a torch.device, and present on this machine."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise WemoeError(f"device must be cpu, cuda, cuda:N, auto or a torch.device, got {type(device).__name__}")
    index = re.fullmatch(r"cuda:(\d+)", device)
    if index is None:
        return resolve_device(device)
    resolve_device("cuda")
    if int(index.group(1)) >= torch.cuda.device_count():
        raise WemoeError(f"device {device} does not exist (this machine has {torch.cuda.device_count()} CUDA devices)")
    return device


def load_output(path: str | Path, device: str | torch.device = "cpu") -> VisionTransformer:
    """A wemoe output directory as a module: WEMoE models rebuilt, static merges as a plain ViT.

    Either way ``model(images)`` gives the image embedding and ``model.logits(images, task)``
    uses the stored head of ``task``.
    """
    device = check_device(device)
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
    ckpt = open_checkpoint(path, arch)
    heads: dict[str, Head] = {}
    if record is not None:
        state = _plain_state(record, ckpt)
        heads = _stored_heads(record, ckpt.arch.output_dim)
    else:
        state = ckpt.state_dict()
    module = build_vit(ckpt.arch, state).to(device)
    return LoadedModel(module, ckpt.arch, heads, ckpt.scheme)
