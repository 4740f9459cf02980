"""Task-agnostic evaluation: the model is not told which task an image belongs to.

Its task posterior picks the head (``WEMoEModel.predict``). Scored per task's labelled
images: how often the model names the task (task-identification accuracy), how often
both the task and the class are right (joint accuracy), and, from the same pass, the
accuracy with the task's own head given (the oracle-head setting of the paper's tables).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from wemoe.data import TaskData
from wemoe.errors import WemoeError
from wemoe.model.heads import Head
from wemoe.model.vit import RoutingTrace


@dataclass
class AgnosticResult:
    accuracy: float  # with the task's own head (oracle head)
    task_accuracy: float  # the predicted task is the image's task
    joint_accuracy: float  # predicted task and class both right
    n: int
    loss: float
    seconds: float
    predicted: dict[str, int] = field(default_factory=dict)  # images per predicted task: a row of the confusion table


@torch.inference_mode()
def evaluate_task_agnostic(
    model, task: str, head: Head, data: TaskData, batch_size: int = 64, device: str = "cpu", progress: bool = True, desc: str = "eval"
) -> AgnosticResult:
    """``task``'s labelled images through ``model`` (a ``WEMoEModel`` with every task's head), once."""
    if task not in model.task_names:
        raise WemoeError(f"task-agnostic evaluation covers the merged tasks ({', '.join(model.task_names)}); '{task}' is not one of them")
    model.eval()
    own = model.task_names.index(task)
    started = time.perf_counter()
    correct = task_right = joint = total = 0
    loss_sum = 0.0
    counts = torch.zeros(len(model.task_names), dtype=torch.long)
    with tqdm(total=len(data), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for images, labels in data.batches(batch_size, model.arch, device):
            trace = RoutingTrace()
            features = model.encode(images, trace).float()
            labels = labels.to(features.device)
            logits = head.logits(features)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            index = model.task_posterior(trace).argmax(-1)
            counts += torch.bincount(index.cpu(), minlength=len(model.task_names))
            right = index == own
            task_right += int(right.sum())
            joint += int(((logits.argmax(-1) == labels) & right).sum())  # the predicted head is the own head where the task is right
            total += len(labels)
            bar.update(len(labels))
    predicted = {t: int(c) for t, c in zip(model.task_names, counts.tolist())}
    return AgnosticResult(correct / total, task_right / total, joint / total, total, loss_sum / total, time.perf_counter() - started, predicted)


__all__ = ["AgnosticResult", "evaluate_task_agnostic"]
