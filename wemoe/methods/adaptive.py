"""What methods that adapt on unlabeled task data share: their parameters, data and record.

WEMoE and AdaMerging both train a few coefficients by test-time adaptation on
each task's unlabeled images. The data is loaded and checked here, before any
compute, and recorded (paths, hashes, sizes) in config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wemoe.data import TaskData, check_labels, load_data
from wemoe.errors import WemoeError
from wemoe.merging.inputs import sha256_files

HELP = {
    "steps": "adaptation steps",
    "lr": "learning rate of the adapted coefficients (Adam)",
    "batch_size": "unlabeled images per task per step",
    "cosine": "cosine learning-rate decay",
    "split": "split of --data used for adaptation (npz x_<split> or folder <split>/)",
}


@dataclass(frozen=True)
class AdaptationData:
    task: str
    data: TaskData
    path: str

    def record(self, split: str) -> dict[str, Any]:
        p = Path(self.path)
        return {"path": str(self.path), "sha256": "directory" if p.is_dir() else sha256_files([p]), "split": split, "images": len(self.data)}


def load_adaptation_data(job, split: str) -> dict[str, AdaptationData]:
    """``--data`` per task, in task order; each task adapted on needs its head (labels, if any, must fit it)."""
    out: dict[str, AdaptationData] = {}
    for spec in job.config.tasks:
        if not spec.data:
            continue
        if spec.name not in job.heads:
            raise WemoeError(f"--data for task '{spec.name}' needs its head (--heads {spec.name}=PATH)")
        data = load_data(spec.data, split)
        if (data.labels >= 0).all():  # labels are never used to adapt, but must fit the head they come with
            check_labels(data, job.heads[spec.name].num_classes, spec.name)
        out[spec.name] = AdaptationData(spec.name, data, spec.data)
    return out


def data_plan(job, data: dict[str, AdaptationData]) -> list[str]:
    return [f"data:    {d.task} = {d.path} ({len(d.data)} images)" for d in data.values()]
