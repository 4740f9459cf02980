"""Accuracy and loss of an encoder on a task, with that task's own head.

Every image is scored on its own: the encoders wemoe builds route each sample
independently, so results do not depend on ``batch_size``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from wemoe.arch import ViTArch
from wemoe.checkpoint import open_checkpoint
from wemoe.data import TaskData
from wemoe.heads import Head, load_heads
from wemoe.model.vit import build_vit


@dataclass
class TaskResult:
    accuracy: float
    n: int
    loss: float
    seconds: float


@torch.inference_mode()
def evaluate_task(
    model: nn.Module, head: Head, data: TaskData, arch: ViTArch, batch_size: int = 64, device: str = "cpu",
    progress: bool = True, desc: str = "eval",
) -> TaskResult:
    model.eval()
    started = time.perf_counter()
    correct, total, loss_sum = 0, 0, 0.0
    with tqdm(total=len(data), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for images, labels in data.batches(batch_size, arch, device):
            logits = head.logits(model(images).float())
            labels = labels.to(logits.device)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
            bar.update(len(labels))
    return TaskResult(correct / total, total, loss_sum / total, time.perf_counter() - started)


@dataclass
class LoadedModel:
    module: nn.Module
    arch: ViTArch
    heads: dict[str, Head]
    kind: str


def load_for_inference(path: str | Path, arch: str | None = None, device: str = "cpu") -> LoadedModel:
    """Any checkpoint wemoe reads, or a merge output directory (with its stored heads)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        import json

        cfg = json.loads((p / "config.json").read_text())
        if cfg.get("format") == "wemoe" and cfg.get("method") == "wemoe":
            from wemoe.saved import load_merged

            model = load_merged(p, device=device)  # brings its stored heads
            return LoadedModel(model, model.arch, model.heads, "wemoe")
    heads: dict[str, Head] = {}
    if p.is_dir() and (p / "heads.safetensors").is_file():
        heads = load_heads(p / "heads.safetensors")
    ckpt = open_checkpoint(p, arch)
    module = build_vit(ckpt.arch, ckpt.state_dict()).to(device)
    return LoadedModel(module, ckpt.arch, heads, ckpt.scheme)
