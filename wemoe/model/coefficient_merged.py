"""A ViT whose weights are a trainable combination of task vectors (AdaMerging).

theta(c) = theta_0 + sum_t c[t, g(k)] * tau_t[k] for every tensor k, where g maps a
tensor to its coefficient group: one group for the whole model (task-wise
AdaMerging) or one per tensor (layer-wise: each weight and bias of each block and
each embedding/norm/projection tensor gets its own coefficient per task, as in
the AdaMerging reference implementation). Coefficients are clamped to [0, 1] as
there. The merge is recomputed inside every forward, so gradients reach ``c``
and nothing but ``c`` trains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from wemoe.core.arch import ViTArch
from wemoe.model.vit import VisionTransformer

GRANULARITIES = ("task", "layer")
COEF_RANGE = (0.0, 1.0)


class CoefficientMergedViT(nn.Module):
    """``base`` and ``task_vectors`` (T, *shape) per canonical key, in the model's key order; ``fixed``: tensors not merged (integers)."""

    def __init__(
        self,
        arch: ViTArch,
        task_names: Sequence[str],
        base: Mapping[str, torch.Tensor],
        task_vectors: Mapping[str, torch.Tensor],
        fixed: Mapping[str, torch.Tensor],
        granularity: str,
        init: float,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.arch = arch
        self.granularity = granularity
        self.task_names = list(task_names)
        self.keys = list(base)
        self.groups = ["all"] if granularity == "task" else list(self.keys)
        self._group_of = {k: (0 if granularity == "task" else i) for i, k in enumerate(self.keys)}
        self._base = dict(base)
        self._taus = dict(task_vectors)
        self._fixed = dict(fixed)
        self.raw = nn.Parameter(torch.full((len(self.task_names), len(self.groups)), float(init), device=device))
        with torch.device("meta"):
            self.vit = VisionTransformer(arch, head_bias="head.bias" in self._base)

    def coefficients(self) -> torch.Tensor:
        """(tasks, groups), clamped to [0, 1]."""
        return self.raw.clamp(*COEF_RANGE)

    def merged_state(self, coefficients: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        c = self.coefficients() if coefficients is None else coefficients
        state = dict(self._fixed)
        for key, base in self._base.items():
            taus = self._taus[key]
            state[key] = base + torch.tensordot(c[:, self._group_of[key]], taus, dims=1)
        return state

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return functional_call(self.vit, self.merged_state(), (images,), strict=True)

    def coefficients_of(self, key: str) -> torch.Tensor:
        """The (tasks,) coefficients that scale tensor ``key``'s task vectors."""
        return self.coefficients()[:, self._group_of[key]].detach()
