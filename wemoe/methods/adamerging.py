"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575): task-arithmetic coefficients
per task (``--granularity task``) or per task and tensor (``layer``), trained by entropy
minimisation on unlabeled task data, then merged into a plain checkpoint in the base's scheme.

With ``--steps 0`` (or no data) the coefficients stay at ``--lambda`` and the output is
exactly the task-arithmetic merge at that lambda.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wemoe.merging.engine import write_plain_merge
from wemoe.merging.static import task_arithmetic
from wemoe.methods.adaptive import HELP, data_plan, load_adaptation_data
from wemoe.methods.registry import MergeMethod, param, register
from wemoe.model.merged_coefficients import GRANULARITIES


def weighted_task_arithmetic(base: torch.Tensor, taus, coefficients: torch.Tensor) -> torch.Tensor:
    """theta_0 + sum_t c_t tau_t; a shared coefficient factors out exactly as task arithmetic computes it."""
    c = coefficients.tolist()
    if all(v == c[0] for v in c):
        return task_arithmetic(base, taus, c[0])
    total = torch.zeros_like(base)
    for ct, tau in zip(c, taus):
        total.add_(tau, alpha=ct)
    return total.add_(base)


@register
class AdaMerging(MergeMethod):
    name = "adamerging"
    summary = "task arithmetic with coefficients adapted on unlabeled data"
    adapts = True

    @dataclass(frozen=True)
    class Params:
        lam: float = param(0.3, "initial coefficient of every task vector", key="lambda")
        granularity: str = param("layer", "one coefficient per task (task) or per task and tensor (layer)", choices=GRANULARITIES)
        steps: int = param(500, HELP["steps"], low=0)
        lr: float = param(1e-3, HELP["lr"], low=0.0, low_open=True)
        batch_size: int = param(16, HELP["batch_size"], low=1)
        cosine: bool = param(False, HELP["cosine"])
        split: str = param("test", HELP["split"])

    def prepare(self, job) -> None:
        job.state["data"] = load_adaptation_data(job, job.params.split)

    def plan(self, job) -> list[str]:
        p: AdaMerging.Params = job.params
        steps = p.steps if job.state["data"] else 0
        return [f"adapt:   {steps} steps, lr {p.lr}, {p.batch_size} images/task/step, cosine {p.cosine}", *data_plan(job, job.state["data"])]

    def run(self, job, directory: Path) -> str:
        from wemoe.adapt import adapt_parameters
        from wemoe.model.merged_coefficients import CoefficientMergedViT

        p: AdaMerging.Params = job.params
        data = job.state["data"]
        steps = p.steps if data else 0
        if not data:
            job.note("warning: no --data given: the coefficients stay at --lambda (task arithmetic)")
        started = time.perf_counter()
        model = CoefficientMergedViT(job.inputs, p.granularity, p.lam, job.device)
        result = None
        if data and steps:
            result = adapt_parameters(
                model,
                [model.raw],
                job.heads,
                {t: d.data for t, d in data.items()},
                model.arch,
                steps,
                p.lr,
                p.batch_size,
                p.cosine,
                job.seed,
                job.device,
                job.progress,
                desc="adapting coefficients",
            )
        coefficients = model.coefficients().detach().cpu()
        per_key = {k: model.coefficients_of(k).cpu() for k in model.keys}
        adapt_seconds = time.perf_counter() - started
        del model
        if not job.writes:  # a torchrun rank other than 0: its share of the adaptation is done
            return "adapted"

        def merge(key: str, base: torch.Tensor, taus) -> torch.Tensor:
            return weighted_task_arithmetic(base, taus, per_key[key]) if key in per_key else base

        record = {
            "adamerging": {
                "granularity": p.granularity,
                "groups": ["all"] if p.granularity == "task" else list(per_key),
                "coefficients": {t: [round(v, 6) for v in coefficients[i].tolist()] for i, t in enumerate(job.inputs.task_names)},
                "adaptation": {
                    "data": {t: d.record(p.split) for t, d in data.items()},
                    "steps": steps,
                    "lr": p.lr,
                    "batch_size": p.batch_size,
                    "cosine": p.cosine,
                    "objective": "sum over tasks of mean prediction entropy",
                    "initial_loss": result.initial_loss if result else None,
                    "final_loss": result.final_loss if result else None,
                },
            }
        }
        write_plain_merge(
            job,
            directory,
            merge,
            record_extra=record,
            report_extra={"adapt_seconds": round(adapt_seconds, 3), "loss_curve": [round(v, 6) for v in result.losses] if result else []},
        )
        return f"adamerging ({p.granularity}-wise), {len(job.inputs.tasks)} tasks, {steps} adaptation steps"
