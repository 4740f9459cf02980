"""Task arithmetic (Ilharco et al., ICLR 2023): theta_0 + lambda * sum_i tau_i."""

from __future__ import annotations

from dataclasses import dataclass

from wemoe.core.params import param
from wemoe.methods.arithmetic import task_arithmetic
from wemoe.methods.registry import TensorMerge, register
from wemoe.methods.static import StaticMethod

LAMBDA_HELP = "scale of the summed task vectors"


@register
class TaskArithmetic(StaticMethod):
    name = "task-arithmetic"
    summary = "theta_0 + lambda * sum of task vectors"

    @dataclass(frozen=True)
    class Params:
        lam: float = param(0.3, LAMBDA_HELP, key="lambda")

    def tensor_merge(self, params: Params) -> TensorMerge:
        return lambda _key, base, taus: task_arithmetic(base, taus, params.lam)
