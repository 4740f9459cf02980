"""Accuracy and loss of an encoder on a task, with that task's own head.

Every image is scored on its own: the encoders wemoe builds route each sample
independently, so results do not depend on ``batch_size``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from wemoe.core.arch import ViTArch
from wemoe.data import TaskData
from wemoe.model.heads import Head


@dataclass
class TaskResult:
    accuracy: float
    n: int
    loss: float
    seconds: float


@torch.inference_mode()
def evaluate_task(
    model: nn.Module,
    head: Head,
    data: TaskData,
    arch: ViTArch,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "eval",
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
