"""What methods that adapt on unlabeled task data share: their parameters' help, the data and its record.

WEMoE and AdaMerging both train a few coefficients by test-time adaptation on
each task's unlabeled images. The data is loaded and checked here, before any
compute, and recorded (paths, hashes, sizes) in config.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wemoe.checkpoints.inputs import sha256_files
from wemoe.core.tasks import TaskSpec
from wemoe.data import TaskData, check_labels, load_data
from wemoe.errors import WemoeError
from wemoe.model.heads import Head

HELP = {
    "steps": "adaptation steps",
    "lr": "learning rate of the adapted coefficients (Adam)",
    "batch_size": "unlabeled images per task per step",
    "cosine": "cosine learning-rate decay",
    "split": "split of --data used for adaptation (npz x_<split> or folder <split>/)",
    "objective": "what adaptation minimises: entropy (the paper's), task, entropy+task",
}


@dataclass(frozen=True)
class AdaptationData:
    task: str
    data: TaskData
    path: str

    def record(self, split: str) -> dict[str, Any]:
        p = Path(self.path)
        return {"path": str(self.path), "sha256": "directory" if p.is_dir() else sha256_files([p]), "split": split, "images": len(self.data)}


def load_adaptation_data(tasks: Sequence[TaskSpec], heads: Mapping[str, Head], split: str) -> dict[str, AdaptationData]:
    """``--data`` per task, in task order; each task adapted on needs its head (labels, if any, must fit it)."""
    out: dict[str, AdaptationData] = {}
    for spec in tasks:
        if not spec.data:
            continue
        if spec.name not in heads:
            raise WemoeError(f"--data for task '{spec.name}' needs its head (--heads {spec.name}=PATH)")
        data = load_data(spec.data, split)
        if (data.labels >= 0).all():  # labels are never used to adapt, but must fit the head they come with
            check_labels(data, heads[spec.name].num_classes, spec.name)
        out[spec.name] = AdaptationData(spec.name, data, spec.data)
    return out


def data_plan(data: Mapping[str, AdaptationData]) -> list[str]:
    return [f"data:    {d.task} = {d.path} ({len(d.data)} images)" for d in data.values()]


def adaptation_record(data: Mapping[str, AdaptationData], split: str) -> dict[str, Any]:
    return {t: d.record(split) for t, d in data.items()}


__all__ = ["HELP", "AdaptationData", "adaptation_record", "data_plan", "load_adaptation_data"]
