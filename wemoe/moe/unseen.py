"""Images from none of the merged tasks: a score, a threshold, and the weights that serve them.

The score reads what a shared router reads (``WEMoEModel.router_features``: per block the
token mean and class token, then the embedding, from the pass with the pretrained weights),
standardised. Each merged task's features are modelled as a Gaussian whose covariance is its
top ``components`` principal directions plus one variance for the rest (probabilistic PCA),
shrunk toward the average variance; an image's score is its smallest Mahalanobis distance to
a task. Per-task shapes matter: on the zoo, one covariance shared by the tasks on the final
embedding alone (the first version) caught 17% of held-out tasks' images, this 32%, both at
1% of the merged tasks' (a probe during development: six held-out splits of the zoo's tasks).
Storage is T x features x components, not T x features^2, so it fits CLIP-size features.

The threshold keeps ``keep`` of held-back adaptation images of the merged tasks (e.g. 99%).
Images above it are served by fixed coefficients: all zero (the pretrained weights of every
routed tensor; the base model itself with ``--experts all``) or all lambda (task arithmetic).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from wemoe.data import TaskData, preprocess

FALLBACKS = ("route", "base", "task-arithmetic")  # route: no detection, every image is routed (the paper's)
DEFAULT_COMPONENTS = 64
SHRINK = 0.3  # weight of the average variance in each task's covariance (measured: 0.2-0.5 alike)


class UnseenDetector(nn.Module):
    """Per-task Gaussians (``components`` principal directions + one residual variance) on standardised features."""

    def __init__(self, features: int, num_experts: int, components: int = DEFAULT_COMPONENTS):
        super().__init__()
        self.features, self.num_experts, self.components = int(features), int(num_experts), int(components)
        k = min(self.components, self.features)
        self.register_buffer("feature_mean", torch.zeros(features))
        self.register_buffer("feature_std", torch.ones(features))
        self.register_buffer("means", torch.zeros(num_experts, features))
        self.register_buffer("directions", torch.zeros(num_experts, features, k))  # orthonormal columns per task
        self.register_buffer("direction_weights", torch.zeros(num_experts, k))  # how much of each direction the precision removes
        self.register_buffer("residual", torch.ones(num_experts))  # the variance left off the directions (shrunk)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("fallback", torch.zeros(num_experts))  # the coefficients flagged images get

    def materialize(self, device: torch.device | str = "cpu") -> None:
        self.to_empty(device=device)
        with torch.no_grad():
            for name, buf in self.named_buffers():
                buf.fill_(1.0 if name in ("feature_std", "residual") else 0.0)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) smallest squared Mahalanobis distance of each image to a task's distribution."""
        z = (features.to(self.means.dtype) - self.feature_mean) / self.feature_std
        d = z[:, None, :] - self.means[None]  # (B, T, F)
        along = torch.einsum("btf,tfk->btk", d, self.directions)
        return ((d * d).sum(-1) - (self.direction_weights[None] * along * along).sum(-1)).div(self.residual[None]).min(dim=1).values

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) True where an image belongs to none of the merged tasks."""
        return self.score(features) > self.threshold

    @torch.no_grad()
    def fit(self, features: torch.Tensor, owner: torch.Tensor) -> None:
        """Each task's distribution from its rows of ``features`` (N, F); ``owner`` (N,) the task of each row."""
        x = features.double()
        mean, std = x.mean(0), x.std(0) + 1e-3
        z = (x - mean) / std
        k = self.directions.shape[-1]
        for t in range(self.num_experts):
            rows = z[owner == t]
            centre = rows.mean(0)
            c = rows - centre
            _, s, vh = torch.linalg.svd(c, full_matrices=False)
            variances = s * s / max(len(c), 1)
            top = torch.zeros(k, dtype=z.dtype, device=z.device)
            top[: min(k, len(variances))] = variances[:k]
            dirs = torch.zeros(self.features, k, dtype=z.dtype, device=z.device)
            dirs[:, : min(k, len(vh))] = vh[:k].T
            total = float(variances.sum())
            rest = max(total - float(top.sum()), 0.0) / max(self.features - k, 1)
            # covariance: (1 - SHRINK) * (top directions' variances, ``rest`` on the other directions) + SHRINK * average
            # variance; its inverse is 1/a off the directions and 1/along on them, i.e. (I - sum_j w_j u_j u_j^T) / a
            a = max((1 - SHRINK) * rest + SHRINK * total / self.features, 1e-12)
            along = (1 - SHRINK) * top + SHRINK * total / self.features
            self.means[t] = centre.to(self.means.dtype)
            self.directions[t] = dirs.to(self.directions.dtype)
            self.direction_weights[t] = (1 - a / along.clamp_min(1e-12)).to(self.direction_weights.dtype)
            self.residual[t] = a
        self.feature_mean.copy_(mean.to(self.feature_mean.dtype))
        self.feature_std.copy_(std.to(self.feature_std.dtype))

    def extra_repr(self) -> str:
        return f"features={self.features}, num_experts={self.num_experts}, components={self.components}"


@torch.no_grad()
def fit_unseen(model: Any, data: Mapping[str, TaskData], images: int, keep: float, fallback: torch.Tensor, seed: int, device: str) -> dict[str, Any]:
    """Fit the detector of ``model`` on up to ``images`` adaptation images per task: half estimate the tasks'
    distributions, the other half set the threshold that keeps ``keep`` of them."""
    detector: UnseenDetector = model.unseen
    rng = np.random.default_rng(seed + 2)
    fit_rows, cal_rows, owners = [], [], []
    for t, task in enumerate(model.task_names):
        d = data[task]
        idx = rng.choice(len(d), size=min(images, len(d)), replace=False)
        half = max(1, len(idx) // 2)
        feats = []
        for start in range(0, len(idx), 128):
            feats.append(model.router_features(preprocess(d.take(np.sort(idx[start : start + 128])), model.arch, device)).double())
        feats = torch.cat(feats)
        fit_rows.append(feats[:half])
        cal_rows.append(feats[half:] if len(feats) > half else feats)
        owners += [t] * half
    detector.fit(torch.cat(fit_rows), torch.tensor(owners, device=fit_rows[0].device))
    scores = detector.score(torch.cat(cal_rows).to(detector.means.dtype))
    detector.threshold.fill_(float(torch.quantile(scores.double(), keep)))
    detector.fallback.copy_(fallback.to(detector.fallback.dtype))
    return {
        "images": int(sum(len(r) for r in fit_rows) + len(scores)),
        "threshold": round(float(detector.threshold), 6),
        "kept": round(float((scores <= detector.threshold).double().mean()), 6),
    }


__all__ = ["DEFAULT_COMPONENTS", "FALLBACKS", "UnseenDetector", "fit_unseen"]
