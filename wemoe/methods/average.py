"""Simple weight averaging: mean_i theta_i = theta_0 + mean_i tau_i."""

from __future__ import annotations

from dataclasses import dataclass

from wemoe.methods.arithmetic import average
from wemoe.methods.registry import TensorMerge, register
from wemoe.methods.static import StaticMethod


@register
class Average(StaticMethod):
    name = "average"
    summary = "simple weight averaging"

    @dataclass(frozen=True)
    class Params:
        pass

    def tensor_merge(self, params: Params) -> TensorMerge:
        return lambda _key, base, taus: average(base, taus)
