"""A merge method that lives only in the tests: registering it must be all it takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wemoe.methods import StaticMethod, TensorMerge, param, register


@register
class ScaledMean(StaticMethod):
    name = "scaled-mean"
    summary = "theta_0 + alpha * mean of the task vectors (a test method)"

    @dataclass(frozen=True)
    class Params:
        alpha: float = param(0.5, "scale of the mean task vector", low=0.0, high=2.0)
        ties_k: float = param(10.0, "unused here: a key another method also declares", low=0.0, high=100.0)

    def tensor_merge(self, params: Params) -> TensorMerge:
        def merge(_key: str, base: torch.Tensor, taus) -> torch.Tensor:
            taus = list(taus)
            return base + params.alpha * sum(taus) / len(taus)

        return merge
