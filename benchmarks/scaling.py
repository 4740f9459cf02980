"""How accuracy, size and time grow with the number of merged tasks: the zoo's first 8, 14 and 20 tasks.

    python -m benchmarks.scaling                   # 8, 14 and 20 tasks, every method
    python -m benchmarks.scaling --counts 8,20 --methods task-arithmetic,recommended

For each count n, merges the zoo's first n tasks (``ALL_TASKS``: the main job's eight, then
the twelve more) through the real CLI with every method row of the main table (task
arithmetic and TIES with lambda chosen on labelled train images as the main table does,
layer-wise AdaMerging, the paper's WEMoE, the recommended configuration) and evaluates them
on the test split; the individual models' average over the same tasks is the reference.
The cost side of each merge is measured in the same run: merge time, peak memory of the
merge process, output size against a plain checkpoint, forward time against a plain model
(interleaved repeats, best of each) and adaptation time per step. Writes
benchmarks/results/scaling.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.accuracy.rows import ADAMERGING, BEST, LAMBDA_GRID, PAPER, TIES_LAMBDA_GRID
from benchmarks.accuracy.runner import Zoo, evaluate, evaluate_report, merge_args, own_expert_ceiling, pick_lambda
from benchmarks.common import REPO, RESULTS, machine_description

COUNTS = (8, 14, 20)
VAL_LIMIT = 300  # labelled train images per task for choosing a static merge's lambda (the main table's)
FORWARD_BATCH, FORWARD_REPEATS = 64, 5
# method -> (label, `wemoe merge` flags; None: lambda chosen on the validation grid)
METHODS: dict[str, tuple[str, list | None]] = {
    "task-arithmetic": ("task arithmetic (lambda chosen on train images)", None),
    "ties": ("TIES (lambda chosen on train images)", None),
    "adamerging": ("AdaMerging, layer-wise", ADAMERGING["adamerging-layer"][1]),
    "wemoe-paper": ("WEMoE, the paper's", [*PAPER[1], "--lambda", 0.3]),
    "recommended": ("WEMoE, recommended", [*BEST[1], "--lambda", 0.3]),
}
GRIDS = {"task-arithmetic": LAMBDA_GRID, "ties": TIES_LAMBDA_GRID}
# goals of the issue (fractions): recommended at the largest count
GOAL_OF_INDIVIDUAL, GOAL_OVER_TA = 0.95, 0.15


def merge_measured(zoo: Zoo, out: Path, flags: list) -> tuple[list[str], float, float]:
    """Run `wemoe merge` as its own process: (args, wall seconds, peak resident MB of that process)."""
    args = merge_args(zoo, out, flags)
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "wemoe", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak resident memory
        seconds = time.perf_counter() - started
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code:
            err.seek(0)
            raise RuntimeError(f"wemoe merge failed ({code}): {err.read().decode(errors='replace').strip()[-500:]}")
    return args, round(seconds, 1), round(usage.ru_maxrss / 1024, 1)


def output_bytes(path: Path) -> int:
    """The model's tensors (model*.safetensors: what a deployment stores), not the card or heads."""
    return sum(p.stat().st_size for p in path.glob("model*.safetensors"))


def forward_ratio(model_dir: Path, plain_dir: Path, images: np.ndarray) -> float:
    """Forward time of ``model_dir`` over a plain model's, best of interleaved repeats in one process."""
    import torch

    import wemoe

    models = [wemoe.load(model_dir), wemoe.load(plain_dir)]
    x = torch.from_numpy(images[:FORWARD_BATCH]).permute(0, 3, 1, 2).float().div(255)
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        for m in models:
            m(x)  # warm-up
        for _ in range(FORWARD_REPEATS):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(x)
                best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] / best[1]


def adaptation_per_step(out: Path) -> float | None:
    """Seconds per adaptation step, from the merge's own report (None: no steps)."""
    report = json.loads((out / "report.json").read_text())
    steps = json.loads((out / "config.json").read_text()).get("wemoe", {}).get("adaptation", {}).get("steps")
    if steps is None:  # AdaMerging records its steps among the parameters
        steps = json.loads((out / "config.json").read_text()).get("parameters", {}).get("steps")
    seconds = report.get("seconds")
    adapt = seconds.get("adapt") if isinstance(seconds, dict) else None  # a static merge records one total
    return round(adapt / steps, 3) if steps and adapt else None


def method_flags(method: str) -> list[str] | None:
    """A method's flags as recorded (None: lambda chosen on the grid): what a carried row must match."""
    flags = METHODS[method][1]
    return None if flags is None else [str(f) for f in flags]


def carried(previous: dict | None, n: int, method: str, tasks: list[str]) -> dict | None:
    """A row of an earlier run for the same tasks and method flags, kept as it was measured."""
    for r in (previous or {}).get("rows", []):
        if r["n_tasks"] == n and r["method"] == method and r["tasks"] == tasks and r.get("flags", "missing") == method_flags(method):
            return {**r, "carried": True}
    return None


def run(
    counts: tuple[int, ...],
    methods: list[str],
    log: Callable[[str], None],
    work_root: Path | None = None,
    previous: dict | None = None,
    on_row: Callable[[dict], None] | None = None,
    fresh: bool = False,
) -> dict:
    """Measure every (count, method) not in ``previous`` (rows of an earlier run, carried over when their tasks
    and flags match; ``fresh``: measured again); rows of other counts and methods are kept. ``on_row`` gets the
    report after each row, so a stopped run keeps what it measured."""
    from benchmarks.zoo import build as zoo_build
    from benchmarks.zoo import datasets as zoo_data

    started = time.perf_counter()
    tasks_all = list(zoo_data.ALL_TASKS)
    if max(counts) > len(tasks_all):
        raise SystemExit(f"--counts: the zoo has {len(tasks_all)} tasks")
    cache = Path(zoo_build.DEFAULT_CACHE)
    log(f"[1/3] zoo: {len(tasks_all[: max(counts)])} tasks in {cache}")
    zoo_build.build(str(cache), tasks=tuple(tasks_all[: max(counts)]))
    plain_size = (cache / "base.safetensors").stat().st_size
    machine = machine_description()
    work = Path(tempfile.mkdtemp(prefix="wemoe-scaling-", dir=work_root))
    report = {
        "rows": [],
        "counts": list(counts),
        "methods": methods,
        "plain_checkpoint_bytes": plain_size,
        "seconds": None,
        "machine": machine,
    }
    rows: list[dict] = report["rows"]
    try:
        log("[2/3] individual models")
        full = Zoo(cache, tasks_all[: max(counts)])
        individual = report["individual_per_task"] = {t: evaluate(full.ckpt(t), full, [t], work)[t] for t in full.tasks}
        with np.load(full.data(full.tasks[0]), allow_pickle=False) as z:
            images = z["x_test"]
        log("[3/3] merges")
        for n in counts:
            zoo = Zoo(cache, tasks_all[:n])
            ind = float(np.mean([individual[t] for t in zoo.tasks]))
            plain = work / f"plain-{n}"  # a plain model of this architecture, for the forward ratio
            for method in methods:
                kept = None if fresh else carried(previous, n, method, zoo.tasks)
                if kept is not None:
                    rows.append(kept)
                    log(f"  {n} tasks, {method}: carried over ({100 * kept['average']:.1f}, measured on {kept.get('machine', 'not recorded')})")
                    continue
                if not plain.exists():
                    merge_measured(zoo, plain, ["--method", "task-arithmetic", "--lambda", 0.3])
                label, flags = METHODS[method]
                extra: dict = {}
                if flags is None:
                    lam, scores = pick_lambda(zoo, work, method, GRIDS[method], VAL_LIMIT, lambda m: None)
                    flags, extra = ["--method", method, "--lambda", lam], {"lambda": lam, "validation": scores}
                out = work / f"{method}-{n}"
                args, seconds, rss = merge_measured(zoo, out, flags)
                if method == "recommended":  # where its loss comes from: how often its router names the task, each expert alone
                    agnostic = evaluate_report(out, zoo, zoo.tasks, work, agnostic=True)
                    per_task = {t: agnostic[t]["accuracy"] for t in zoo.tasks}
                    own = own_expert_ceiling(out, zoo)
                    extra |= {
                        "routing_accuracy": float(np.mean([agnostic[t]["task_accuracy"] for t in zoo.tasks])),
                        "own_expert_average": float(np.mean([own[t] for t in zoo.tasks])),
                        "predicted": {t: agnostic[t]["predicted"] for t in zoo.tasks},  # the routing confusion table, by rows
                    }
                else:
                    per_task = evaluate(out, zoo, zoo.tasks, work)
                average = float(np.mean(list(per_task.values())))
                rows.append(
                    {
                        "n_tasks": n,
                        "method": method,
                        "label": label,
                        "flags": method_flags(method),
                        "average": average,
                        "individual": ind,
                        "of_individual": average / ind,
                        "per_task": per_task,
                        "tasks": zoo.tasks,
                        "args": [a.replace(str(out), f"<out>/{method}-{n}") for a in args],
                        "merge_seconds": seconds,
                        "peak_rss_mb": rss,
                        "size_vs_plain": round(output_bytes(out) / plain_size, 3),
                        "forward_vs_plain": round(forward_ratio(out, plain, images), 3),
                        "adapt_seconds_per_step": adaptation_per_step(out),
                        "machine": machine,
                        **extra,
                    }
                )
                log(f"  {n} tasks, {method}: {100 * average:.1f} ({100 * average / ind:.1f}% of individual {100 * ind:.1f}), merge {seconds} s")
                shutil.rmtree(out, ignore_errors=True)
                report["seconds"] = round(time.perf_counter() - started, 1)
                if on_row is not None:
                    on_row(keep_other_rows({**report, "rows": list(rows)}, previous))
            shutil.rmtree(plain, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return keep_other_rows(report, previous)


def keep_other_rows(report: dict, previous: dict | None) -> dict:
    """The earlier run's rows of counts and methods this run did not cover, kept (a run of some rows adds to the file)."""
    done = {(r["n_tasks"], r["method"]) for r in report["rows"]}
    others = [{**r, "carried": True} for r in (previous or {}).get("rows", []) if (r["n_tasks"], r["method"]) not in done]
    report["rows"] += others
    report["counts"] = sorted({*report["counts"], *(r["n_tasks"] for r in others)})
    report["methods"] = [m for m in METHODS if m in {*report["methods"], *(r["method"] for r in others)}]
    return report


def find(report: dict, n: int, method: str) -> dict | None:
    return next((r for r in report["rows"] if r["n_tasks"] == n and r["method"] == method), None)


def goals(report: dict) -> list[str]:
    """The issue's goals, each stated as met or missed by how much."""
    counts = report["counts"]
    hi, lo = max(counts), min(counts)
    rec, ta = find(report, hi, "recommended"), find(report, hi, "task-arithmetic")
    lines = []
    if rec:
        share = rec["of_individual"]
        verdict = "met" if share >= GOAL_OF_INDIVIDUAL else f"missed by {100 * (GOAL_OF_INDIVIDUAL - share):.1f} points"
        lines.append(f"- Recommended at {hi} tasks >= {100 * GOAL_OF_INDIVIDUAL:.0f}% of the individual models: {100 * share:.1f}%, {verdict}.")
        if share < GOAL_OF_INDIVIDUAL and "own_expert_average" in rec:
            lines.append("  " + why_short(report, rec))
        if ta:
            gap = rec["average"] - ta["average"]
            verdict = "met" if gap >= GOAL_OVER_TA else f"missed by {100 * (GOAL_OVER_TA - gap):.1f} points"
            lines.append(f"- Recommended >= task arithmetic + {100 * GOAL_OVER_TA:.0f} at {hi} tasks: +{100 * gap:.1f}, {verdict}.")
    if hi != lo:
        loss = {
            m: find(report, lo, m)["of_individual"] - find(report, hi, m)["of_individual"]
            for m in report["methods"]
            if find(report, lo, m) and find(report, hi, m)
        }
        if "recommended" in loss:
            others = {m: v for m, v in loss.items() if m in ("task-arithmetic", "wemoe-paper")}
            ok = all(loss["recommended"] < v for v in others.values())
            text = ", ".join(f"{m} {100 * v:.1f}" for m, v in others.items())
            missing = [m for m in ("task-arithmetic", "wemoe-paper") if m not in others]
            if missing:
                text += f" ({', '.join(missing)} not measured yet: the goal cannot be judged)"
                ok = False
            lines.append(
                f"- Loss from {lo} to {hi} tasks (points of % of individual): recommended {100 * loss['recommended']:.1f} against {text}: "
                + ("met (smaller than each)." if ok else "not judged." if missing else "missed (not smaller than each).")
            )
        if rec:
            limit = 1 + 0.05 * hi
            verdict = "met" if rec["size_vs_plain"] <= limit else f"missed by {rec['size_vs_plain'] - limit:.2f}x"
            lines.append(
                f"- Output size at {hi} tasks <= 1 + 0.05 x {hi} = {limit:.2f} plain checkpoints, on this zoo's ViT (width 128, so a rank-16 "
                f"factor pair is {16 * (128 + 512)} of a 128 x 512 matrix's {128 * 512} numbers): {rec['size_vs_plain']:.2f}x, {verdict}. "
                "ViT-B/32 sizes: the `benchmarks.speed --experts 20` result files."
            )
    return lines


def why_short(report: dict, rec: dict) -> str:
    """The measured split of the recommended row's shortfall: its experts' ceiling against its routing."""
    ind = rec["individual"]
    own, routed = rec["own_expert_average"] / ind, rec["of_individual"]
    counts = [r for r in report["rows"] if r["method"] == "recommended" and "routing_accuracy" in r]
    trend = ", ".join(f"{r['n_tasks']} tasks {100 * r['routing_accuracy']:.1f}%" for r in sorted(counts, key=lambda r: r["n_tasks"]))
    return (
        f"Measured why: with each task's images sent to its own expert alone (not a method: it reads the task) the configuration "
        f"holds {100 * own:.1f}% of the individual models, so its experts lose {100 * (1 - own):.1f} points and routing "
        f"{100 * (own - routed):.1f} more; its task router names the right task for {trend} of the test images." + confusions(rec)
    )


def confusions(rec: dict, top: int = 5) -> str:
    """The largest off-diagonal cells of the routing confusion table: which tasks' images go to which expert."""
    predicted = rec.get("predicted")
    if not predicted:
        return ""
    cells = []
    for task, counts in predicted.items():
        total = sum(counts.values()) or 1
        cells += [(n / total, task, expert) for expert, n in counts.items() if expert != task and n]
    cells.sort(reverse=True)
    listed = "; ".join(f"{task} -> {expert} {100 * share:.0f}%" for share, task, expert in cells[:top])
    return f" Most confused (images of -> expert): {listed}." if listed else ""


def _individual(report: dict, n: int) -> str:
    r = next((r for r in report["rows"] if r["n_tasks"] == n), None)
    return f"{100 * r['individual']:.1f}" if r else "-"


def markdown(report: dict) -> str:
    counts, methods = report["counts"], report["methods"]
    label = {m: METHODS[m][0] for m in methods}
    lines = [
        "# Scaling with the number of tasks",
        "",
        "Average test accuracy (%) over the zoo's first n tasks (each with its own head) and, in brackets, the share of the individual "
        "fine-tuned models' average on the same tasks. Generated by `python -m benchmarks.scaling`; do not edit by hand.",
        "",
        "| method | " + " | ".join(f"{n} tasks" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
        "| individual fine-tuned | " + " | ".join(_individual(report, n) for n in counts) + " |",
    ]
    for m in methods:
        cells = []
        for n in counts:
            r = find(report, n, m)
            mark = " †" if r and r.get("carried") else ""
            cells.append(f"{100 * r['average']:.1f} ({100 * r['of_individual']:.1f}%){mark}" if r else "-")
        lines.append(f"| {label[m]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cost of each merge, measured in the same run: merge wall time (s), peak resident memory of the merge process (MB), "
        "output size (model tensors) over a plain checkpoint, forward time of 64 images over a plain model of the same "
        "architecture (best of 5 interleaved), adaptation seconds per step.",
        "",
        "| tasks | method | merge s | peak MB | size x plain | forward x plain | s / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in counts:
        for m in methods:
            r = find(report, n, m)
            if r:
                fwd = f"{r['forward_vs_plain']:.2f}" if r["forward_vs_plain"] is not None else "-"
                step = f"{r['adapt_seconds_per_step']:.3f}" if r["adapt_seconds_per_step"] is not None else "-"
                lines.append(f"| {n} | {m} | {r['merge_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['size_vs_plain']:.2f} | {fwd} | {step} |")
    lines += ["", "Goals:", "", *goals(report)]
    lines += [
        "",
        "- The recommended configuration fits its task router instead of adapting (0 steps); its per-step column is empty.",
        "- Every merge's exact `wemoe merge` arguments are in scaling.json (key `args`; `<out>` is the run's scratch directory).",
        "- † carried over from an earlier run (same tasks and method flags; `--fresh` measures the selected rows again); a row never measured is -.",
        f"- Machine: {report['machine']}. Run time of the last run: {report['seconds']} s.",
        "",
        "![scaling](scaling.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = report["counts"]
    fig, (acc, size) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in report["methods"]:
        pts = [(n, find(report, n, m)) for n in counts if find(report, n, m)]
        acc.plot([n for n, _ in pts], [100 * r["of_individual"] for _, r in pts], marker="o", label=METHODS[m][0])
        size.plot([n for n, _ in pts], [r["size_vs_plain"] for _, r in pts], marker="o", label=m)
    acc.set_xlabel("tasks merged")
    acc.set_ylabel("% of the individual models")
    acc.set_xticks(counts)
    acc.grid(alpha=0.3)
    acc.legend(fontsize=7)
    size.set_xlabel("tasks merged")
    size.set_ylabel("output size / plain checkpoint")
    size.set_xticks(counts)
    size.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, results: Path) -> None:
    (results / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / "scaling.md").write_text(markdown(report))
    plot(report, results / "scaling.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)), help="numbers of tasks, comma-separated (default 8,14,20)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--fresh", action="store_true", help="measure the rows of --counts and --methods again instead of carrying them over (other rows are kept)")
    args = ap.parse_args(argv)
    try:
        counts = tuple(sorted({int(c) for c in args.counts.split(",") if c}))
    except ValueError:
        ap.error(f"--counts {args.counts!r}: comma-separated numbers of tasks")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or not counts or min(counts) < 2:
        ap.error(f"--methods: choose from {', '.join(METHODS)}" if unknown or not methods else "--counts: at least 2 tasks")
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    last = args.results / "scaling.json"
    previous = json.loads(last.read_text()) if last.exists() else None
    report = run(counts, methods, lambda m: print(m, flush=True), previous=previous, on_row=lambda r: write(r, args.results), fresh=args.fresh)
    write(report, args.results)
    print(markdown(report))


if __name__ == "__main__":
    main()


__all__ = ["COUNTS", "METHODS", "goals", "main", "markdown", "run"]
