"""Mean routing weights per task: does each task route to its own expert?"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from wemoe.data import TaskData
from wemoe.model.vit import RoutingTrace
from wemoe.moe.model import WEMoEModel


@torch.no_grad()
def mean_routing(model: WEMoEModel, data: TaskData, batch_size: int = 64, device: str = "cpu", progress: bool = False, desc: str = "routing") -> np.ndarray:
    """(routing entries, experts) mean routing weight over the task's images (entries: ``model.route_labels()``)."""
    total = None
    count = 0
    with tqdm(total=len(data), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for images, _ in data.batches(batch_size, model.arch, device):
            r = torch.stack(model.routing(images)).float()  # (routes, B, T)
            s = r.sum(1).cpu()
            total = s if total is None else total + s
            count += r.shape[1]
            bar.update(r.shape[1])
    return (total / count).numpy()


@torch.no_grad()
def expert_counts(model: WEMoEModel, data: TaskData, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """(T,) how many of the task's images went mainly to each expert (the largest task posterior; per-block routers:
    the largest coefficient averaged over routed groups): a row of the routing confusion table."""
    counts = torch.zeros(len(model.task_names), dtype=torch.long)
    for images, _ in data.batches(batch_size, model.arch, device):
        trace = RoutingTrace()
        model.encode(images, trace)
        counts += torch.bincount(model.task_posterior(trace).argmax(-1).cpu(), minlength=len(model.task_names))
    return counts.numpy()


def confusion_heatmap(experts: list[str], counts: dict[str, np.ndarray], path: str | Path, title: str = "") -> None:
    """Task's images (rows) x the expert they went to (columns), as shares of each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(counts)
    shares = np.stack([counts[t] / max(1, counts[t].sum()) for t in tasks])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(experts), 0.8 + 0.45 * len(tasks)))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(tasks)):
        for j in range(len(experts)):
            if counts[tasks[i]][j]:
                ax.text(j, i, f"{100 * shares[i, j]:.0f}", ha="center", va="center", fontsize=7, color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(experts)), experts, rotation=60, fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel("expert the images went to (% of the task's images)")
    ax.set_ylabel("task of the images")
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def routing_table(model: WEMoEModel, means: dict[str, np.ndarray]) -> str:
    experts = model.task_names
    width = max(6, *(len(e) for e in experts))
    labels = model.route_labels()
    lw = max(5, *(len(label) for label in labels))
    lines = []
    for task, m in means.items():
        lines.append(f"task {task}: mean routing weight per routed layer (rows) and expert (columns)")
        lines.append(f"{'block':>{lw}}  " + "  ".join(f"{e:>{width}}" for e in experts))
        for label, row in zip(labels, m):
            lines.append(f"{label:>{lw}}  " + "  ".join(f"{v:>{width}.3f}" for v in row))
        own = experts.index(task) if task in experts else None
        if own is not None:
            wins = int((m.argmax(1) == own).sum())
            lines.append(f"own expert '{task}' has the largest weight in {wins}/{len(m)} routed layers")
        lines.append("")
    return "\n".join(lines)


def routing_heatmap(model: WEMoEModel, means: dict[str, np.ndarray], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(means)
    labels = model.route_labels()
    cols = min(4, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    vmin = min(float(m.min()) for m in means.values())
    vmax = max(float(m.max()) for m in means.values())
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, (0.25 * len(labels) + 2.2) * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.9, wspace=0.35)
    image = None
    for ax, task in zip(axes.flat, tasks):
        image = ax.imshow(means[task], aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(f"data: {task}", fontsize=9)
        ax.set_xticks(range(len(model.task_names)), model.task_names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("block", fontsize=8)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="mean routing weight")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
