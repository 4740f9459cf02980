"""Images from none of the merged tasks: a score, a threshold, and the weights that serve them.

The score is the Mahalanobis distance of an image's embedding (from the pass with the
pretrained weights that a shared router reads) to the nearest merged task: one mean per
task and one shared covariance (shrunk toward its diagonal), fitted on the adaptation
images. The threshold keeps ``keep`` of held-back adaptation images of the merged tasks
(e.g. 99%). Images above it are served by fixed coefficients: all zero (the pretrained
weights of every routed tensor; the base model itself with ``--experts all``) or all lambda
(task arithmetic).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from wemoe.data import TaskData, preprocess

FALLBACKS = ("route", "base", "task-arithmetic")  # route: no detection, every image is routed (the paper's)
SHRINK = 0.1


class UnseenDetector(nn.Module):
    def __init__(self, embed: int, num_experts: int):
        super().__init__()
        self.embed = int(embed)
        self.register_buffer("means", torch.zeros(num_experts, embed))
        self.register_buffer("precision", torch.eye(embed))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("fallback", torch.zeros(num_experts))  # the coefficients flagged images get

    def materialize(self, device: torch.device | str = "cpu") -> None:
        self.to_empty(device=device)
        with torch.no_grad():
            self.means.zero_()
            self.precision.copy_(torch.eye(self.embed, device=device))
            self.threshold.zero_()
            self.fallback.zero_()

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) squared Mahalanobis distance of each embedding to the nearest task mean."""
        z = features[:, -self.embed :].to(self.means.dtype)
        d = z[:, None, :] - self.means[None]  # (B, T, E)
        return torch.einsum("bte,ef,btf->bt", d, self.precision, d).min(dim=1).values

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) True where an image belongs to none of the merged tasks."""
        return self.score(features) > self.threshold


@torch.no_grad()
def fit_unseen(model: Any, data: Mapping[str, TaskData], images: int, keep: float, fallback: torch.Tensor, seed: int, device: str) -> dict[str, Any]:
    """Fit the detector of ``model`` on up to ``images`` adaptation images per task: half estimate the task means and
    the covariance, the other half set the threshold that keeps ``keep`` of them."""
    detector: UnseenDetector = model.unseen
    rng = np.random.default_rng(seed + 2)
    fit_rows, cal_rows, owners = [], [], []
    for t, task in enumerate(model.task_names):
        d = data[task]
        idx = rng.choice(len(d), size=min(images, len(d)), replace=False)
        half = max(1, len(idx) // 2)
        feats = []
        for start in range(0, len(idx), 128):
            feats.append(model.router_features(preprocess(d.take(np.sort(idx[start : start + 128])), model.arch, device))[:, -detector.embed :].double())
        feats = torch.cat(feats)
        fit_rows.append(feats[:half])
        cal_rows.append(feats[half:] if len(feats) > half else feats)
        owners += [t] * half
    fit = torch.cat(fit_rows)
    owner = torch.tensor(owners, device=fit.device)
    means = torch.stack([fit[owner == t].mean(0) for t in range(len(model.task_names))])
    centred = fit - means[owner]
    cov = centred.T @ centred / len(centred)
    cov = (1 - SHRINK) * cov + SHRINK * torch.eye(len(cov), dtype=cov.dtype, device=cov.device) * cov.diagonal().mean()
    detector.means.copy_(means.to(detector.means.dtype))
    detector.precision.copy_(torch.linalg.inv(cov).to(detector.precision.dtype))
    scores = detector.score(torch.cat(cal_rows).to(detector.means.dtype))
    detector.threshold.fill_(float(torch.quantile(scores.double(), keep)))
    detector.fallback.copy_(fallback.to(detector.fallback.dtype))
    return {
        "images": int(len(fit) + len(scores)),
        "threshold": round(float(detector.threshold), 6),
        "kept": round(float((scores <= detector.threshold).double().mean()), 6),
    }


__all__ = ["FALLBACKS", "UnseenDetector", "fit_unseen"]
