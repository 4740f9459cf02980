"""Own-expert ceilings of WEMoE models with other routed layers and expert ranks, and their size.

For each configuration (which linears are routed: mlp, attn, both; dense or rank-R
experts) the real WEMoE model is built with ``wemoe.methods.wemoe.build.build_wemoe`` from the
zoo's checkpoints, and every test image of a task is routed to that task's own
expert alone (``model.fixed_routing``). That is the accuracy a perfect router could
reach with that configuration: it reads the task label, so it is a diagnostic, not a
method. Sizes are the merged model's numbers (routers included) as a multiple of one
plain ViT, at the zoo's width and at CLIP ViT-B/32 with 8 tasks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from wemoe.checkpoints.inputs import load_inputs
from wemoe.core.arch import KNOWN_ARCHS, ViTArch
from wemoe.data import load_data
from wemoe.evaluation.accuracy import evaluate_task
from wemoe.methods.wemoe.build import build_wemoe
from wemoe.moe.experts import store_of_rank
from wemoe.moe.model import WEMoEModel, parameter_count
from wemoe.moe.spec import MoESpec

# (groups, rank): rank None = dense task vectors
CONFIGS: tuple[tuple[tuple[str, ...], int | None], ...] = (
    (("mlp",), None),
    (("attn",), None),
    (("attn", "mlp"), None),
    *[(("mlp",), r) for r in (4, 16, 32)],
    *[(("attn", "mlp"), r) for r in (4, 16, 32)],
)
B32 = ViTArch(**KNOWN_ARCHS["ViT-B-32-quickgelu"])


def config_label(groups: Sequence[str], rank: int | None) -> str:
    routed = "mlp+attn" if len(groups) == 2 else groups[0]
    return f"{routed}, {'dense' if rank is None else f'rank {rank}'}"


def own_expert_accuracy(model: WEMoEModel, data_paths: dict[str, str], batch_size: int = 128) -> dict[str, float]:
    """Test accuracy of each task with every image routed to that task's expert alone (coefficient 1, others 0)."""
    out = {}
    for task, path in data_paths.items():
        onehot = torch.zeros(len(model.task_names))
        onehot[model.task_names.index(task)] = 1.0
        with model.fixed_routing(onehot):
            out[task] = evaluate_task(model, model.heads[task], load_data(path, "test"), model.arch, batch_size=batch_size, progress=False).accuracy
    return out


def routed_ceilings(cache: str, lam: float, tasks: Sequence[str], configs=CONFIGS) -> list[dict]:
    from wemoe.model.heads import load_head

    inputs = load_inputs(os.path.join(cache, "base.safetensors"), [(t, os.path.join(cache, "tasks", f"{t}.safetensors")) for t in tasks], progress=False)
    heads = {t: load_head(os.path.join(cache, "heads", f"head_{t}.safetensors")) for t in tasks}
    data = {t: os.path.join(cache, "data", f"{t}.npz") for t in tasks}
    arch = inputs.base.arch
    rows = []
    for groups, rank in configs:
        spec = MoESpec(blocks=tuple(range(arch.depth)), groups=groups, store=store_of_rank(rank), init_lambda=lam)
        model, energy = build_wemoe(inputs, spec, progress=False)
        model.heads = heads
        accuracy = own_expert_accuracy(model, data)
        kept = [v for values in energy.values() for v in values]
        rows.append(
            {
                "label": config_label(groups, rank),
                "groups": list(groups),
                "rank": rank,
                "per_task": accuracy,
                "average": sum(accuracy.values()) / len(accuracy),
                "energy_kept": sum(kept) / len(kept) if kept else 1.0,
                "size_zoo": parameter_count(arch, len(tasks), spec) / parameter_count(arch, len(tasks), None),
                "size_b32": parameter_count(B32, 8, MoESpec(blocks=tuple(range(B32.depth)), groups=groups, store=store_of_rank(rank)))
                / parameter_count(B32, 8, None),
            }
        )
        print(f"{rows[-1]['label']:24s} {100 * rows[-1]['average']:5.1f}  size {rows[-1]['size_zoo']:.2f}x zoo, {rows[-1]['size_b32']:.2f}x B/32", flush=True)
        del model
    return rows


def render_routed(rows: list[dict], tasks: Sequence[str], individual: float) -> list[str]:
    lines = [
        "",
        "## Own-expert ceilings by routed layers and expert rank",
        "",
        "The real WEMoE model of each configuration (`--experts`, `--expert-rank`; non-routed tensors task arithmetic), "
        "every test image routed to its own task's expert alone. Size: numbers the merged model stores (2-layer routers "
        "included) as a multiple of one plain ViT, at the zoo's width 128 and at CLIP ViT-B/32 with 8 tasks. "
        "Energy: mean fraction of a task vector's squared Frobenius norm the kept rank holds.",
        "",
        "| routed, experts | " + " | ".join(tasks) + " | **avg** | % of individual | energy kept | size (zoo) | size (ViT-B/32 x 8) |",
        "|---|" + "---|" * (len(tasks) + 5),
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | "
            + " | ".join(f"{100 * r['per_task'][t]:.1f}" for t in tasks)
            + f" | **{100 * r['average']:.1f}** | {100 * r['average'] / individual:.1f}% | {100 * r['energy_kept']:.1f}% "
            f"| {r['size_zoo']:.2f}x | {r['size_b32']:.2f}x |"
        )
    fits = [r for r in rows if r["average"] / individual >= 0.97 and r["size_b32"] <= 1.5]
    best = max(fits, key=lambda r: r["average"]) if fits else None
    lines += [
        "",
        "- Goal (routed-layers issue): a mlp+attn low-rank configuration with a ceiling >= 97% of the individual models that "
        "costs <= 1.5x a plain ViT-B/32: "
        + (f"met by **{best['label']}** ({100 * best['average'] / individual:.1f}%, {best['size_b32']:.2f}x)." if best else "not met by any row."),
    ]
    return lines
