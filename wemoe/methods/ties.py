"""TIES-merging (Yadav et al., NeurIPS 2023): trim, elect signs, disjoint mean, scale."""

from __future__ import annotations

from dataclasses import dataclass

from wemoe.core.params import param
from wemoe.methods.arithmetic import ties
from wemoe.methods.registry import TensorMerge, register
from wemoe.methods.static import StaticMethod
from wemoe.methods.task_arithmetic import LAMBDA_HELP


@register
class Ties(StaticMethod):
    name = "ties"
    summary = "TIES-merging (trim, elect sign, disjoint mean)"

    @dataclass(frozen=True)
    class Params:
        lam: float = param(1.0, LAMBDA_HELP, key="lambda")
        ties_k: float = param(20.0, "percent of task-vector entries kept per tensor", low=0.0, low_open=True, high=100.0)

    def tensor_merge(self, params: Params) -> TensorMerge:
        return lambda _key, base, taus: ties(base, taus, params.lam, params.ties_k)
