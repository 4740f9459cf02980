"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575): task-arithmetic coefficients
per task (``--granularity task``) or per task and tensor (``layer``), trained by test-time
adaptation on unlabeled task data (``--objective``, entropy by default), then merged into
a plain checkpoint in the base's scheme.

With ``--steps 0`` (or no data) the coefficients stay at ``--lambda`` and the output is
exactly the task-arithmetic merge at that lambda.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from wemoe.adaptation.data import HELP, AdaptationData, adaptation_record, data_plan, load_adaptation_data
from wemoe.adaptation.loop import adapt_parameters
from wemoe.adaptation.objectives import OBJECTIVES, Objective
from wemoe.checkpoints.inputs import MergeInputs
from wemoe.checkpoints.task_vectors import base_tensor, stacked_task_vectors
from wemoe.core.params import component, param
from wemoe.errors import UsageError
from wemoe.methods.arithmetic import task_arithmetic
from wemoe.methods.registry import MergeMethod, MethodContext, MethodResult, register
from wemoe.model.coefficient_merged import GRANULARITIES, CoefficientMergedViT


def weighted_task_arithmetic(base: torch.Tensor, taus, coefficients: torch.Tensor) -> torch.Tensor:
    """theta_0 + sum_t c_t tau_t; a shared coefficient factors out exactly as task arithmetic computes it."""
    c = coefficients.tolist()
    if all(v == c[0] for v in c):
        return task_arithmetic(base, taus, c[0])
    total = torch.zeros_like(base)
    for ct, tau in zip(c, taus):
        total.add_(tau, alpha=ct)
    return total.add_(base)


def coefficient_model(inputs: MergeInputs, granularity: str, init: float, device: str) -> CoefficientMergedViT:
    """The trainable merge of ``inputs``: every floating-point tensor's base and task-vector stack."""
    base, taus, fixed = {}, {}, {}
    for key in inputs.base.keys():
        b = base_tensor(inputs, key, device)
        if inputs.base.dtype(key).is_floating_point:
            base[key] = b
            taus[key] = stacked_task_vectors(inputs, key, b, device)
        else:
            fixed[key] = b
    return CoefficientMergedViT(inputs.base.arch, inputs.task_names, base, taus, fixed, granularity, init, device)


@dataclass
class State:
    data: dict[str, AdaptationData]
    objective: Objective


@register
class AdaMerging(MergeMethod):
    name = "adamerging"
    summary = "task arithmetic with coefficients adapted on unlabeled data"
    adapts = True

    @dataclass(frozen=True)
    class Params:
        lam: float = param(0.3, "initial coefficient of every task vector", key="lambda")
        granularity: str = param("layer", "one coefficient per task (task) or per task and tensor (layer)", choices=GRANULARITIES)
        objective: str = component(OBJECTIVES, "entropy", HELP["objective"])
        steps: int = param(500, HELP["steps"], low=0)
        lr: float = param(1e-3, HELP["lr"], low=0.0, low_open=True)
        batch_size: int = param(16, HELP["batch_size"], low=1)
        cosine: bool = param(False, HELP["cosine"])
        split: str = param("test", HELP["split"])

    def prepare(self, ctx: MethodContext) -> State:
        p = ctx.params
        objective = OBJECTIVES.create(p.objective, p)
        if objective.uses_routing:
            raise UsageError(f"--objective {p.objective} trains routers; --method adamerging has none (use entropy)")
        return State(load_adaptation_data(ctx.tasks, ctx.heads, p.split), objective)

    def plan(self, ctx: MethodContext, state: State) -> list[str]:
        p = ctx.params
        steps = p.steps if state.data else 0
        return [
            f"adapt:   {steps} steps, lr {p.lr}, {p.batch_size} images/task/step, cosine {p.cosine}, objective {state.objective.name}",
            *data_plan(state.data),
        ]

    def run(self, ctx: MethodContext, state: State) -> MethodResult:
        p = ctx.params
        data = state.data
        steps = p.steps if data else 0
        if not data:
            ctx.note("warning: no --data given: the coefficients stay at --lambda (task arithmetic)")
        started = time.perf_counter()
        model = coefficient_model(ctx.inputs, p.granularity, p.lam, ctx.device)
        result = None
        if data and steps:
            result = adapt_parameters(
                model,
                [model.raw],
                ctx.heads,
                {t: d.data for t, d in data.items()},
                model.arch,
                steps,
                p.lr,
                p.batch_size,
                p.cosine,
                ctx.seed,
                ctx.device,
                ctx.progress,
                desc="adapting coefficients",
                objective=state.objective,
            )
        coefficients = model.coefficients().detach().cpu()
        per_key = {k: model.coefficients_of(k).cpu() for k in model.keys}
        adapt_seconds = time.perf_counter() - started
        del model

        def merge(key: str, base: torch.Tensor, taus: Any) -> torch.Tensor:
            return weighted_task_arithmetic(base, taus, per_key[key]) if key in per_key else base

        section = {
            "granularity": p.granularity,
            "groups": ["all"] if p.granularity == "task" else list(per_key),
            "coefficients": {t: [round(v, 6) for v in coefficients[i].tolist()] for i, t in enumerate(ctx.inputs.task_names)},
            "adaptation": {
                "data": adaptation_record(data, p.split),
                "steps": steps,
                "lr": p.lr,
                "batch_size": p.batch_size,
                "cosine": p.cosine,
                "objective": state.objective.describe(),
                "initial_loss": result.initial_loss if result else None,
                "final_loss": result.final_loss if result else None,
            },
        }
        report = {"adapt_seconds": round(adapt_seconds, 3), "loss_curve": [round(v, 6) for v in result.losses] if result else []}
        summary = f"adamerging ({p.granularity}-wise), {len(ctx.inputs.tasks)} tasks, {steps} adaptation steps"
        return MethodResult(summary, merge=merge, section=section, report=report)
