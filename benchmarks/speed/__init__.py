"""Speed and memory of wemoe at real scale (CLIP ViT-B/32 by default, 8 experts).

    python -m benchmarks.speed                       # ViT-B/32, 8 experts, batch 64
    python -m benchmarks.speed --arch ViT-L-14-quickgelu --batch 8 --per-task 2
    python -m benchmarks.speed --experts 20

Random-init checkpoints in the open_clip layout (task checkpoints = base plus
random perturbations of 1-3% of each tensor's norm, like real fine-tuning).
Every number is a ratio measured in ONE run, each stage in its own process so
its peak RSS is its own:
  a. `wemoe merge` wall time and peak RSS for task arithmetic and the WEMoE
     build (no adaptation), against the on-disk size of (output + one input);
  b. batch inference: WEMoE per-sample routing vs the plain ViT vs a naive
     per-sample loop (a few samples, scaled), outputs checked equal;
  c. one adaptation step (T tasks x 16 images, forward + backward of the
     routers) vs the plain ViT forward + backward on the same images;
  d. peak RSS of (b) and (c).
Writes benchmarks/results/speed*.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS, SPEED_CACHE, machine_description, machine_tag
from benchmarks.speed.measure import _gb, measure, run_child, stage_checkpoints, stage_merges
from benchmarks.speed.report import GOALS, LOW_RANK_GOALS, config_label, goals_of, readme_summary, report_md, shortfall_notes, update_readme


def fitting_inputs(work: Path, tasks: int, arch: str) -> list[str]:
    """Random heads and 32 random images per task (written once) for routers fitted on images: their speed, not their sense."""
    import numpy as np
    import torch

    from wemoe.core.arch import KNOWN_ARCHS
    from wemoe.io.safetensors_io import save_tensors

    a = KNOWN_ARCHS[arch]
    heads, data = [], []
    for i in range(tasks):
        head, images = work / f"head{i:02d}.safetensors", work / f"images{i:02d}.npz"
        if not head.exists():
            save_tensors(head, {"weight": torch.randn(10, a["embed_dim"], generator=torch.Generator().manual_seed(i))}, {"normalize": "true"})
        if not images.exists():
            rng = np.random.default_rng(i)
            np.savez(images, x_test=rng.integers(0, 255, (32, a["image_size"], a["image_size"], 3), dtype=np.uint8))
        heads.append(f"task{i:02d}={head}")
        data.append(f"task{i:02d}={images}")
    return ["--heads", *heads, "--data", *data]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed", description="Speed and memory of wemoe at real scale.")
    ap.add_argument("--arch", default="ViT-B-32-quickgelu")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--routed", default="mlp", help="wemoe --experts: mlp, attn, mlp,attn or all")
    ap.add_argument("--router", default="mlp", help="wemoe --router (task, exemplar: fitted on random images made here)")
    ap.add_argument("--expert-rank", default="full", help="wemoe --expert-rank: full or R")
    ap.add_argument("--expert-svd", default="exact", help="wemoe --expert-svd (with --expert-rank R): exact or randomized")
    ap.add_argument("--expert-dtype", default="float32", help="wemoe --expert-dtype (with --expert-rank R): float32 or int8")
    ap.add_argument("--small-experts", default="whole", help="wemoe --small-experts (with --routed all and a compressing store): whole or compressed")
    ap.add_argument("--expert-store", default="auto", help="wemoe --expert-store: auto, dense, low-rank or sign-mask")
    ap.add_argument("--expert-density", default="0.1", help="wemoe --expert-density (with --expert-store sign-mask)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--per-task", type=int, default=16)
    ap.add_argument("--naive-samples", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--rerender", action="store_true", help="rewrite the .md reports and README summary from the stored .json (no measuring)")
    ap.add_argument("--stage", choices=["checkpoints", "inference", "step"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        run_child(args)
        return
    if args.rerender:
        for path in sorted(args.results.glob("speed*.json")):
            result = json.loads(path.read_text())
            result["notes"] = shortfall_notes(result)
            path.write_text(json.dumps(result, indent=2) + "\n")
            path.with_suffix(".md").write_text(report_md(result))
        update_readme(args.results)
        return
    tag = f"{args.arch}-{args.experts}"
    work = SPEED_CACHE / tag
    print(f"checkpoints: {work}", flush=True)
    base, tasks = stage_checkpoints(args.arch, args.experts, work)
    print("(a) merges", flush=True)
    wemoe_flags = ["--experts", args.routed, "--expert-rank", args.expert_rank, "--router", args.router]
    sign_mask = args.expert_store == "sign-mask"
    if args.expert_rank != "full":
        wemoe_flags += ["--expert-svd", args.expert_svd, "--expert-dtype", args.expert_dtype]
    if sign_mask:
        wemoe_flags += ["--expert-store", "sign-mask", "--expert-density", args.expert_density]
    if (args.expert_rank != "full" or sign_mask) and args.small_experts != "whole":
        wemoe_flags += ["--small-experts", args.small_experts]
    if args.router in ("task", "exemplar"):  # routers fitted on images: random ones, with random heads (speed only)
        wemoe_flags += fitting_inputs(work, len(tasks), args.arch) + ["--router-images", "32", "--steps", "0"]
    merges = stage_merges(base, tasks, work, args.threads, wemoe_flags)
    model = work / "merged-wemoe"
    child = [sys.executable, "-m", "benchmarks.speed", "--stage"]
    common = ["--model", str(model), "--base", str(base), "--threads", str(args.threads)]
    print("(b) inference", flush=True)
    _, rss_b, out_b = measure(child + ["inference", *common, "--batch", str(args.batch), "--naive-samples", str(args.naive_samples)])
    print("(c) adaptation step", flush=True)
    _, rss_c, out_c = measure(child + ["step", *common, "--per-task", str(args.per_task)])
    import torch

    result = {
        "arch": args.arch,
        "experts": args.experts,
        "routed": args.routed,
        "router": args.router,
        "rank": args.expert_rank,
        "expert_svd": args.expert_svd,
        "expert_dtype": args.expert_dtype,
        "small_experts": args.small_experts,
        **({"expert_store": "sign-mask", "expert_density": float(args.expert_density)} if sign_mask else {}),
        "batch": args.batch,
        "threads": args.threads,
        "device": "cpu",
        "machine": machine_description(),
        "command": "python -m benchmarks.speed " + " ".join(a for a in (argv or sys.argv[1:])),
        "merge": merges,
        "inference": json.loads(out_b.strip().splitlines()[-1]),
        "step": json.loads(out_c.strip().splitlines()[-1]),
        "inference_rss_gb": _gb(rss_b),
        "step_rss_gb": _gb(rss_c),
        "torch": torch.__version__,
    }
    b, c = result["inference"], result["step"]
    result["ratios"] = {
        "forward_vs_naive": b["naive_s_scaled"] / b["wemoe_s"],
        "forward_vs_einsum_loop": b["naive_einsum_s_scaled"] / b["wemoe_s"],
        "forward_vs_expert_loop": b["naive_loop_s_scaled"] / b["wemoe_s"],
        "forward_vs_plain": b["wemoe_s"] / b["plain_s"],
        "step_vs_plain": c["wemoe_step_s"] / c["plain_fwd_bwd_s"],
        "merge_rss_task_arithmetic": merges["task-arithmetic"]["rss_ratio"],
        "merge_rss_wemoe": merges["wemoe"]["rss_ratio"],
        "file_vs_plain": (model / "model.safetensors").stat().st_size / base.stat().st_size,
    }
    result["notes"] = shortfall_notes(result)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "speed" if (args.arch, args.experts) == ("ViT-B-32-quickgelu", 8) else f"speed_{args.arch}_{args.experts}"
    if (args.routed, args.expert_rank) != ("mlp", "full"):
        stem += f"_{args.routed.replace(',', '+')}_r{args.expert_rank}"
    if args.router != "mlp":
        stem += f"_{args.router}"
    if args.expert_rank != "full" and args.expert_svd != "exact":
        stem += f"_{args.expert_svd}-svd"
    if args.expert_rank != "full" and args.expert_dtype != "float32":
        stem += f"_{args.expert_dtype}"
    if sign_mask:
        stem += f"_sign-mask-{float(args.expert_density):g}"
    if (args.expert_rank != "full" or sign_mask) and args.small_experts != "whole":
        stem += f"_small-{args.small_experts}"
    stem += f"_{machine_tag(result['machine'])}"  # the same goal is judged on every CPU it was measured on
    md = report_md(result)
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(md)
    if args.results.resolve() == RESULTS.resolve():
        update_readme(args.results)
    print(md)


__all__ = [
    "GOALS",
    "LOW_RANK_GOALS",
    "config_label",
    "goals_of",
    "machine_description",
    "machine_tag",
    "main",
    "readme_summary",
    "report_md",
    "shortfall_notes",
]
