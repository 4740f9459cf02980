"""WEMoE (Tang et al., ICML 2024): MoE upscaling of the MLPs, router test-time adaptation, one checkpoint.

The pieces live where a reader looks for them: the model is built in
``wemoe.upscale``, the routers are trained in ``wemoe.adapt``, the checkpoint is
written by ``wemoe.saved``. This module binds them to the registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wemoe.errors import UsageError, WemoeError
from wemoe.io.hf_config import own_model_config
from wemoe.methods.adaptive import HELP, data_plan, load_adaptation_data
from wemoe.methods.registry import MergeMethod, param, register
from wemoe.model.moe import COEF_GUARDS, DEFAULT_COEF_GUARD
from wemoe.model.routers import ROUTER_KINDS, TRAINING_FREE, RouterSpec
from wemoe.objectives import OBJECTIVES, make_objective
from wemoe.runtime import dtype_name


def parse_coef_range(spec: str | None) -> tuple[float, float] | None:
    if spec is None or str(spec).lower() in ("none", ""):
        return None
    try:
        lo, hi = (float(v) for v in str(spec).split(","))
    except ValueError:
        raise WemoeError(f"--coef-range must be LO,HI (e.g. 0,1) or none, got '{spec}'") from None
    if not lo < hi:
        raise WemoeError(f"--coef-range needs LO < HI, got '{spec}'")
    return lo, hi


def _check_blocks(spec: str) -> None:
    from wemoe.model.wemoe_model import parse_moe_blocks

    parse_moe_blocks(spec, 10**6)  # syntax only; the range is checked against the architecture


def _check_groups(spec: str) -> None:
    from wemoe.model.wemoe_model import parse_groups

    parse_groups(spec)


def parse_rank(spec: str) -> int | None:
    """``full`` -> None (dense task vectors), else a positive integer rank."""
    if str(spec).strip().lower() == "full":
        return None
    try:
        rank = int(str(spec))
    except ValueError:
        raise WemoeError(f"--expert-rank must be 'full' or a positive integer, got '{spec}'") from None
    if rank < 1:
        raise WemoeError(f"--expert-rank must be at least 1, got {rank}")
    return rank


@register
class WEMoE(MergeMethod):
    name = "wemoe"
    summary = "weight-ensembling mixture of experts with routers adapted on unlabeled data"
    adapts = True

    @dataclass(frozen=True)
    class Params:
        lam: float = param(0.3, "task-arithmetic scale of the non-MoE weights and the routers' initial output", key="lambda")
        moe_blocks: str = param("all", "blocks made MoE: all, last:N, first:N or 0,3,5", check=_check_blocks)
        experts: str = param("mlp", "which linears of an MoE block are routed: mlp, attn or mlp,attn", check=_check_groups)
        expert_rank: str = param("full", "task vectors of routed weights kept whole (full) or as rank-R SVD factors", check=parse_rank)
        router: str = param("mlp", "router kind: mlp (the paper's), linear, constant, or training-free prototype, subspace", choices=ROUTER_KINDS)
        router_temperature: float = param(0.0, "softmax temperature of prototype/subspace routers (0: 0.05 / 1.0)", low=0.0)
        router_top_k: int = param(0, "prototype/subspace routers keep the k largest weights (0: all)", low=0)
        gate_rank: int = param(16, "subspace routers: right singular vectors per task vector", low=1)
        router_images: int = param(256, "prototype routers: images per task their prototypes are the mean of", low=1)
        coef_range: str = param("0,1", "keep routing coefficients in LO,HI, or none (guards against entropy collapse)", check=parse_coef_range)
        coef_guard: str = param(DEFAULT_COEF_GUARD, "how --coef-range is kept: clamp, or straight-through (gradient passes)", choices=COEF_GUARDS)
        objective: str = param("entropy", "what router adaptation minimises: entropy (the paper's), task, entropy+task", choices=OBJECTIVES)
        task_weight: float = param(1.0, "weight of the task term in entropy+task", low=0.0)
        steps: int = param(1000, HELP["steps"], low=0)
        lr: float = param(1e-4, HELP["lr"], low=0.0, low_open=True)
        batch_size: int = param(16, HELP["batch_size"], low=1)
        cosine: bool = param(False, HELP["cosine"])
        split: str = param("test", HELP["split"])

    def prepare(self, job) -> None:
        from wemoe.model.wemoe_model import MoESpec, parse_groups, parse_moe_blocks

        p: WEMoE.Params = job.params
        arch = job.inputs.base.arch
        spec = MoESpec(
            blocks=tuple(parse_moe_blocks(p.moe_blocks, arch.depth)),
            groups=parse_groups(p.experts),
            rank=parse_rank(p.expert_rank),
            router=RouterSpec(p.router, p.router_temperature or None, p.router_top_k, p.gate_rank),
            init_lambda=p.lam,
            coef_range=parse_coef_range(p.coef_range),
            coef_guard=p.coef_guard,
        )
        if p.router == "subspace" and p.gate_rank > min(arch.width, arch.mlp_width):
            raise WemoeError(f"--gate-rank {p.gate_rank} is above the smaller side ({min(arch.width, arch.mlp_width)}) of the routed matrices")
        if spec.rank is not None:
            smallest = min(arch.width, arch.mlp_width)  # every routed matrix is width x width or larger
            if spec.rank > smallest:
                raise WemoeError(f"--expert-rank {spec.rank} is above the smaller side ({smallest}) of the routed matrices")
        job.state["spec"] = spec
        job.state["data"] = load_adaptation_data(job, p.split)
        if p.objective != "entropy" and not job.state["data"]:
            raise UsageError(f"--objective {p.objective} needs --data (unlabeled images of each task)")
        missing = [t for t in job.inputs.task_names if t not in job.state["data"]]
        if p.router == "prototype" and missing:
            raise UsageError(f"--router prototype needs --data for every task (missing: {', '.join(missing)})")
        job.state["objective"] = make_objective(p.objective, p.task_weight)

    def plan(self, job) -> list[str]:
        p: WEMoE.Params = job.params
        steps = p.steps if job.state["data"] else 0
        s = job.state["spec"]
        return [
            f"moe:     blocks {list(s.blocks)}, routed {','.join(s.groups)}, experts {'dense' if s.rank is None else f'rank {s.rank}'}, "
            f"router {s.router.kind}, coef range {s.coef_range} ({s.coef_guard})",
            f"adapt:   {steps} steps, lr {p.lr}, {p.batch_size} images/task/step, cosine {p.cosine}",
            *data_plan(job, job.state["data"]),
        ]

    def run(self, job, directory: Path) -> str:
        from wemoe.adapt import adapt_routers
        from wemoe.fit_routers import fit_routers
        from wemoe.saved import write_wemoe
        from wemoe.upscale import build_wemoe

        p: WEMoE.Params = job.params
        spec, data = job.state["spec"], job.state["data"]
        steps = p.steps if data else 0
        if not data:
            job.note("warning: no --data given: the routers stay untrained and the model is close to task arithmetic")
        missing = [t for t in job.inputs.task_names if t not in job.heads]
        if missing:
            job.note(f"note: no head for task(s) {', '.join(missing)}: model.logits() will not serve them")
        started = time.perf_counter()
        model, energy = build_wemoe(job.inputs, spec, seed=job.seed, progress=job.progress)
        model.heads = dict(job.heads)
        if energy:
            kept = [v for values in energy.values() for v in values]
            job.note(f"rank-{spec.rank} experts keep {100 * sum(kept) / len(kept):.1f}% of the task vectors' energy on average (least {100 * min(kept):.1f}%)")
        if spec.router.kind in TRAINING_FREE:
            model.to(job.device)
            fit_routers(model, {t: d.data for t, d in data.items()}, p.router_images, job.seed, job.device)
            job.note(f"{spec.router.kind} routers fitted")
        build_seconds = time.perf_counter() - started
        result = None
        if data:
            model.to(job.device)
            result = adapt_routers(
                model,
                job.heads,
                {t: d.data for t, d in data.items()},
                steps=steps,
                lr=p.lr,
                batch_size=p.batch_size,
                cosine=p.cosine,
                seed=job.seed,
                device=job.device,
                progress=job.progress,
                objective=job.state["objective"],
            )
            model.to("cpu")
            for w in result.warnings:
                job.warn(w)
        if not job.writes:  # a torchrun rank other than 0: its share of the adaptation is done
            return "adapted"
        out_dtype = job.dtype or torch.float32
        config = job.record(out_dtype)
        config["wemoe"] = {
            **spec.to_record(),
            "experts": job.inputs.task_names,
            "energy_kept": energy or None,
            "adaptation": {
                "data": {t: d.record(p.split) for t, d in data.items()},
                "steps": steps,
                "lr": p.lr,
                "batch_size": p.batch_size,
                "cosine": p.cosine,
                "objective": job.state["objective"].description,
                "initial_loss": result.initial_loss if result else None,
                "final_loss": result.final_loss if result else None,
                "diagnostics": result.diagnostics if result else None,
                "warnings": result.warnings if result else [],
            },
        }
        base = job.inputs.base
        own = own_model_config(base.scheme, base.source.config, base.arch, out_dtype)
        if own is not None:  # the base library's config, for the plain checkpoints `wemoe export` writes
            config["model_config"] = own
        write_wemoe(
            directory,
            model,
            config,
            out_dtype,
            job.shard_size,
            report=lambda: {
                "seconds": {
                    "build": round(build_seconds, 3),
                    "adapt": round(result.seconds, 3) if result else 0.0,
                    "total": round(time.perf_counter() - started, 3),
                },
                "device": job.device,
                "loss_curve": [round(v, 6) for v in result.losses] if result else [],
            },
        )
        return (
            f"wemoe, {len(job.inputs.tasks)} experts, {len(spec.blocks)} MoE blocks ({','.join(spec.groups)}), "
            f"{steps} adaptation steps, dtype {dtype_name(out_dtype)}"
        )
