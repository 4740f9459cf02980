"""WEMoE (Tang et al., ICML 2024): MoE upscaling of the routed linears, router test-time adaptation, one module.

The steps live beside this module: the model is built in ``build``, training-free
routers are fitted by their kind (``wemoe.moe.routers``), the routers are trained in
``adapt``; the job writes the module (``wemoe.merging.job``). Routers, expert
stores and objectives are picked from their registries (``--router``,
``--expert-store``, ``--objective``), each kind bringing its own options.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from wemoe.adaptation.data import HELP, AdaptationData, adaptation_record, data_plan, load_adaptation_data
from wemoe.adaptation.objectives import OBJECTIVES, Objective
from wemoe.core.arch import ViTArch
from wemoe.core.params import component, param
from wemoe.errors import UsageError, WemoeError
from wemoe.methods.registry import MergeMethod, MethodContext, MethodResult, register
from wemoe.methods.wemoe.adapt import adapt_routers
from wemoe.methods.wemoe.build import build_wemoe
from wemoe.moe.block import COEF_GUARDS, DEFAULT_COEF_GUARD
from wemoe.moe.experts import EXPERT_STORES
from wemoe.moe.routers import ROUTERS, RouterCheck
from wemoe.moe.spec import SMALL_EXPERTS, MoESpec, parse_groups, parse_moe_blocks, routes_rest
from wemoe.moe.unseen import DEFAULT_COMPONENTS, FALLBACKS, fit_unseen


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


def _check_small_experts(spec: MoESpec, arch: ViTArch) -> None:
    """``--small-experts compressed`` needs ``--experts all`` and factors that fit the patch embedding and the projection."""
    if not spec.rest:
        raise UsageError("--small-experts compressed applies to the patch embedding and projection that --experts all routes: add --experts all")
    if spec.store.name == "dense":
        raise UsageError("--small-experts compressed keeps them as the blocks' experts are kept: give --expert-rank R or --expert-store sign-mask")
    rank = getattr(spec.store, "rank", None)
    if rank is None:
        return
    sides = {"patch embedding": min(arch.width, 3 * arch.patch_size**2), **({"projection": min(arch.width, arch.embed_dim)} if arch.embed_dim else {})}
    for what, side in sides.items():
        if rank > side:
            raise UsageError(f"--small-experts compressed: --expert-rank {rank} is above the {what}'s smaller side ({side})")


def _check_blocks(spec: str) -> None:
    parse_moe_blocks(spec, 10**6)  # syntax only; the range is checked against the architecture


@dataclass
class State:
    """What ``prepare`` validated and loaded for ``run``."""

    spec: MoESpec
    data: dict[str, AdaptationData]
    objective: Objective


@register
class WEMoE(MergeMethod):
    name = "wemoe"
    summary = "weight-ensembling mixture of experts with routers adapted on unlabeled data"
    adapts = True
    produces = "moe"

    @dataclass(frozen=True)
    class Params:
        lam: float = param(0.3, "task-arithmetic scale of the non-MoE weights and the routers' initial output", key="lambda")
        moe_blocks: str = param("all", "blocks made MoE: all, last:N, first:N or 0,3,5", check=_check_blocks)
        experts: str = param("mlp", "what is routed: mlp, attn, mlp,attn, or all (norms, embeddings, projection too)", check=parse_groups)
        expert_store: str = component(
            EXPERT_STORES,
            "auto",
            "how routed task vectors are kept: auto (dense for --expert-rank full, else low-rank), dense, low-rank, sign-mask",
            extra_choices=("auto",),
        )
        small_experts: str = param(
            "whole",
            "--experts all: keep the patch embedding's and the projection's task vectors whole, or compressed as the blocks' are "
            "(--expert-rank R, --expert-dtype)",
            choices=SMALL_EXPERTS,
        )
        router: str = component(ROUTERS, "mlp", "router kind: per group mlp (the paper's), linear, constant, prototype, subspace; per image task, exemplar")
        coef_range: str = param("0,1", "keep routing coefficients in LO,HI, or none (guards against entropy collapse)", check=parse_coef_range)
        coef_guard: str = param(DEFAULT_COEF_GUARD, "how --coef-range is kept: clamp, or straight-through (gradient passes)", choices=COEF_GUARDS)
        unseen: str = param(
            "route", "images of no merged task: route them anyway (route), or serve them the base or task-arithmetic weights", choices=FALLBACKS
        )
        unseen_keep: float = param(0.99, "--unseen: share of the merged tasks' held-back adaptation images the threshold keeps", low=0.5, high=1.0)
        unseen_images: int = param(1024, "--unseen: adaptation images per task it is fitted on (half for the distribution, half for the threshold)", low=4)
        unseen_components: int = param(
            DEFAULT_COMPONENTS, "--unseen: principal directions kept per task's feature distribution (the rest is one variance)", low=1, high=4096
        )
        objective: str = component(OBJECTIVES, "entropy", HELP["objective"])
        steps: int = param(1000, HELP["steps"], low=0)
        lr: float = param(1e-4, HELP["lr"], low=0.0, low_open=True)
        batch_size: int = param(16, HELP["batch_size"], low=1)
        cosine: bool = param(False, HELP["cosine"])
        split: str = param("test", HELP["split"])

    def prepare(self, ctx: MethodContext) -> State:
        p = ctx.params
        arch = ctx.inputs.base.arch
        spec = MoESpec(
            blocks=tuple(parse_moe_blocks(p.moe_blocks, arch.depth)),
            groups=parse_groups(p.experts),
            store=EXPERT_STORES.create(p.expert_store, p),
            router=ROUTERS.create(p.router, p),
            init_lambda=p.lam,
            coef_range=parse_coef_range(p.coef_range),
            coef_guard=p.coef_guard,
            rest=routes_rest(p.experts),
            unseen=p.unseen,
            unseen_components=p.unseen_components,
            small_experts=p.small_experts,
        )
        if spec.small_experts == "compressed":
            _check_small_experts(spec, arch)
        if spec.rest and not spec.router.shared:
            routers = ", ".join(n for n, k in ROUTERS.items() if k.shared)
            raise UsageError(f"--experts all routes the embeddings too, before any block: it needs a router computed once per image (--router {routers})")
        spec.store.check(arch)
        data = load_adaptation_data(ctx.tasks, ctx.heads, p.split)
        if spec.unseen != "route":
            if not spec.router.shared:
                routers = ", ".join(n for n, k in ROUTERS.items() if k.shared)
                raise UsageError(f"--unseen {spec.unseen} reads the embedding a router computed once per image reads: use --router {routers}")
            missing = [t for t in ctx.inputs.task_names if t not in data]
            if missing:
                raise UsageError(
                    f"--unseen {spec.unseen} is calibrated on every merged task's images: give --data for every task (missing: {', '.join(missing)})"
                )
        spec.router.check(RouterCheck(arch, ctx.inputs.task_names, {t: len(d.data) for t, d in data.items()}))
        objective = OBJECTIVES.create(p.objective, p)
        if data and p.steps and not spec.router.trainable:
            raise UsageError(f"--router {spec.router.name} has nothing adaptation can train: give --steps 0")
        if p.objective != "entropy" and not data:
            raise UsageError(f"--objective {p.objective} needs --data (unlabeled images of each task)")
        return State(spec, data, objective)

    def plan(self, ctx: MethodContext, state: State) -> list[str]:
        p = ctx.params
        steps = p.steps if state.data else 0
        s = state.spec
        return [
            f"moe:     blocks {list(s.blocks)}, routed {s.describe_routed()}, experts {s.store.describe()}, "
            f"router {s.router.name}, coef range {s.coef_range} ({s.coef_guard})",
            f"adapt:   {steps} steps, lr {p.lr}, {p.batch_size} images/task/step, cosine {p.cosine}",
            *data_plan(state.data),
        ]

    def run(self, ctx: MethodContext, state: State) -> MethodResult:
        p = ctx.params
        spec, data = state.spec, state.data
        steps = p.steps if data else 0
        if not data:
            ctx.note("warning: no --data given: the routers stay untrained and the model is close to task arithmetic")
        missing = [t for t in ctx.inputs.task_names if t not in ctx.heads]
        if missing:
            ctx.note(f"note: no head for task(s) {', '.join(missing)}: model.logits() will not serve them")
        started = time.perf_counter()
        model, energy = build_wemoe(ctx.inputs, spec, seed=ctx.seed, progress=ctx.progress)
        model.heads = dict(ctx.heads)
        if energy:
            kept = [v for values in energy.values() for v in values]
            ctx.note(
                f"{spec.store.describe()} experts keep {100 * sum(kept) / len(kept):.1f}% of the task vectors' energy on average (least {100 * min(kept):.1f}%)"
            )
        task_data = {t: d.data for t, d in data.items()}
        fitted = None
        if spec.router.fitted:
            model.to(ctx.device)
            fitted = spec.router.fit(model, task_data, ctx.seed, ctx.device)
            ctx.note(f"{spec.router.name} routers fitted" + (f" ({', '.join(f'{k} {v}' for k, v in fitted.items())})" if fitted else ""))
        unseen = None
        if spec.unseen != "route":
            fallback = torch.zeros(len(ctx.inputs.tasks)) if spec.unseen == "base" else torch.full((len(ctx.inputs.tasks),), spec.init_lambda)
            model.to(ctx.device)
            unseen = fit_unseen(model, task_data, p.unseen_images, p.unseen_keep, fallback, ctx.seed, ctx.device)
            ctx.note(f"unseen-image threshold {unseen['threshold']:.4g} keeps {100 * unseen['kept']:.1f}% of the merged tasks' held-back images")
        build_seconds = time.perf_counter() - started
        result = None
        if data:
            model.to(ctx.device)
            result = adapt_routers(
                model,
                ctx.heads,
                task_data,
                steps=steps,
                lr=p.lr,
                batch_size=p.batch_size,
                cosine=p.cosine,
                seed=ctx.seed,
                device=ctx.device,
                progress=ctx.progress,
                objective=state.objective,
            )
            model.to("cpu")
            for w in result.warnings:
                ctx.warn(w)
        section: dict[str, Any] = {
            **spec.to_record(),
            "experts": ctx.inputs.task_names,
            "energy_kept": energy or None,
            **({"router_fit": fitted} if fitted else {}),
            **({"unseen_fit": {"keep": p.unseen_keep, **unseen}} if unseen else {}),
            "adaptation": {
                "data": adaptation_record(data, p.split),
                "steps": steps,
                "lr": p.lr,
                "batch_size": p.batch_size,
                "cosine": p.cosine,
                "objective": state.objective.describe(),
                "initial_loss": result.initial_loss if result else None,
                "final_loss": result.final_loss if result else None,
                "diagnostics": result.diagnostics if result else None,
                "warnings": result.warnings if result else [],
            },
        }
        adapt_seconds = round(result.seconds, 3) if result else 0.0
        report = {
            "seconds": {"build": round(build_seconds, 3), "adapt": adapt_seconds, "total": round(time.perf_counter() - started, 3)},
            "loss_curve": [round(v, 6) for v in result.losses] if result else [],
        }
        summary = f"wemoe, {len(ctx.inputs.tasks)} experts, {len(spec.blocks)} MoE blocks ({','.join(spec.groups)}), {steps} adaptation steps"
        return MethodResult(summary, module=model, section=section, report=report)
