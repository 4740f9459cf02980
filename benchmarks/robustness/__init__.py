"""Robustness to corrupted test images: the zoo's eight tasks under the WEMoE paper's seven corruptions.

    python -m benchmarks.robustness

Merges (through the real CLI, on clean data: routers and coefficients never see a corrupted
image, as in the paper) task arithmetic, layer-wise AdaMerging, the paper's WEMoE and the
recommended configuration, then evaluates them and every individual fine-tuned model on
each task's test images, clean and under each corruption (one fixed severity, seeded, so
every method sees the same corrupted images). Writes robustness.md/.json/.png to
benchmarks/results/. Merges are kept in benchmarks/cache/robustness/ and reused while their
arguments are unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.accuracy import BEST, PAPER, RESULTS, Zoo, evaluate, run_merge
from benchmarks.accuracy.rows import ADAMERGING
from benchmarks.accuracy.runner import evaluate_report, own_expert_ceiling, without_out
from benchmarks.common import REPO, machine_description
from benchmarks.robustness.corruptions import CORRUPTIONS, corrupt

CACHE = REPO / "benchmarks" / "cache" / "robustness"
SEED = 0
LAMBDA = ["--lambda", 0.3]
AUGMIX = "recommended-augmix"
# method -> (label, `wemoe merge` flags); "individual" is each task's own fine-tuned model
METHODS: dict[str, tuple[str, list]] = {
    "task-arithmetic": ("task arithmetic (lambda 0.3)", ["--method", "task-arithmetic", *LAMBDA]),
    "adamerging": ("AdaMerging, layer-wise", [*ADAMERGING["adamerging-layer"][1], *LAMBDA]),
    "wemoe-paper": ("WEMoE, the paper's", [*PAPER[1], *LAMBDA]),
    "recommended": ("WEMoE, recommended", [*BEST[1], *LAMBDA]),
    # opt-in: its task router fitted on AugMix views too (operations disjoint from the corruptions)
    AUGMIX: ("WEMoE, recommended, router fitted on AugMix views too (--router-augment augmix)", [*BEST[1], *LAMBDA, "--router-augment", "augmix"]),
}
ROUTED = ("recommended", AUGMIX)  # rows whose routing accuracy and own-expert ceiling are measured too
LABELS = {"individual": "individual fine-tuned", **{k: v[0] for k, v in METHODS.items()}}
# the loss under corruption the recommended configuration may have beyond the individual models' (points)
GOAL_MARGIN = 0.02


class CorruptedZoo(Zoo):
    """The zoo with each task's data file replaced by its corrupted copy."""

    def __init__(self, zoo: Zoo, data_dir: Path):
        super().__init__(zoo.cache, zoo.tasks)
        self.data_dir = data_dir

    def data(self, t: str) -> Path:
        return self.data_dir / f"{t}.npz"


def corrupted_data(zoo: Zoo, name: str) -> Path:
    """Each task's test split under corruption ``name``, written once (seeded by corruption and task)."""
    out = CACHE / "data" / name
    out.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(zoo.tasks):
        target = out / f"{t}.npz"
        if target.exists():
            continue
        with np.load(zoo.data(t), allow_pickle=False) as z:
            x, y, classes = z["x_test"], z["y_test"], z["classes"]
        seed = SEED + 1000 * list(CORRUPTIONS).index(name) + i
        tmp = out / f".{t}.tmp.npz"
        np.savez(tmp, x_test=corrupt(name, x, seed), y_test=y, classes=classes)
        tmp.replace(target)
    return out


def merged(zoo: Zoo, key: str, flags: list, log) -> tuple[Path, list[str], float | None]:
    """The merge of ``key``, reused from the cache while its arguments are unchanged."""
    out = CACHE / "models" / key
    stamp = out.parent / f"{key}.args.json"
    wanted = list(without_out(["--out", str(out), *[str(f) for f in flags]]))
    if out.is_dir() and stamp.exists() and json.loads(stamp.read_text()).get("flags") == wanted:
        log(f"  {key}: reusing {out}")
        return out, json.loads(stamp.read_text())["args"], None
    log(f"  {key}: merging")
    out.parent.mkdir(parents=True, exist_ok=True)
    args, seconds = run_merge(zoo, out, flags)
    stamp.write_text(json.dumps({"flags": wanted, "args": args}) + "\n")
    return out, args, seconds


def rows_for(method: str, per_task: dict[str, float], corruption: str, args: list[str] | None) -> dict:
    return {"method": method, "corruption": corruption, "average": sum(per_task.values()) / len(per_task), "per_task": per_task, "args": args}


def run(log) -> dict:
    from benchmarks.zoo import build as zoo_build
    from benchmarks.zoo import datasets as zoo_data
    from benchmarks.zoo.quickeval import require_built

    cache = Path(zoo_build.DEFAULT_CACHE)
    require_built(str(cache))
    zoo = Zoo(cache, list(zoo_data.TASKS))
    started = time.perf_counter()
    log("[1/3] corrupted test images")
    views = {"clean": zoo, **{name: CorruptedZoo(zoo, corrupted_data(zoo, name)) for name in CORRUPTIONS}}
    log("[2/3] merges on clean data")
    models = {key: merged(zoo, key, flags, log) for key, (_, flags) in METHODS.items()}
    log("[3/3] evaluation")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="wemoe-robust-"))
    try:
        for corruption, view in views.items():
            per_task = {t: evaluate(zoo.ckpt(t), view, [t], work)[t] for t in zoo.tasks}
            rows.append(rows_for("individual", per_task, corruption, None))
            for key, (path, args, _) in models.items():
                if key not in ROUTED:
                    rows.append(rows_for(key, evaluate(path, view, zoo.tasks, work), corruption, args))
                    continue
                # where its loss comes from: how often the router still names the task, and what each task's own expert alone gives
                report = evaluate_report(path, view, zoo.tasks, work, agnostic=True)
                r = rows_for(key, {t: report[t]["accuracy"] for t in zoo.tasks}, corruption, args)
                r["routing_accuracy"] = sum(report[t]["task_accuracy"] for t in zoo.tasks) / len(zoo.tasks)
                own = own_expert_ceiling(path, view)
                r["own_expert_average"] = sum(own.values()) / len(own)
                rows.append(r)
            log(f"  {corruption}: " + ", ".join(f"{r['method']} {100 * r['average']:.1f}" for r in rows[-1 - len(models) :]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "rows": rows,
        "tasks": zoo.tasks,
        "corruptions": list(CORRUPTIONS),
        "merge_seconds": {k: v[2] for k, v in models.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_description(),
    }


def present_methods(report: dict) -> list[str]:
    """The methods the report has rows of (an earlier run may lack the opt-in rows), in table order."""
    measured = {r["method"] for r in report["rows"]}
    return [m for m in ["individual", *METHODS] if m in measured]


def verdict_of(drop: float, individual: float) -> str:
    return "met" if drop <= individual + GOAL_MARGIN + 1e-9 else f"missed by {100 * (drop - individual - GOAL_MARGIN):.2f} points"


def average_of(report: dict, method: str, corruption: str) -> float:
    return next(r["average"] for r in report["rows"] if r["method"] == method and r["corruption"] == corruption)


def mean_drop(report: dict, method: str) -> float:
    """Clean accuracy minus the mean accuracy over the corruptions."""
    corrupted = [average_of(report, method, c) for c in report["corruptions"]]
    return average_of(report, method, "clean") - sum(corrupted) / len(corrupted)


def markdown(report: dict) -> str:
    methods = present_methods(report)
    cols = ["clean", *report["corruptions"]]
    lines = [
        "# Robustness to corrupted test images",
        "",
        "Average test accuracy (%) over the zoo's eight tasks, each task with its own head, on clean test images and under each of "
        "the WEMoE paper's seven corruptions (one fixed severity, seeded: `benchmarks/robustness/corruptions.py`). Merges, router "
        "fitting and adaptation use clean data only. Generated by `python -m benchmarks.robustness`; do not edit by hand.",
        "",
        "| method | " + " | ".join(c.replace("_", " ") for c in cols) + " | mean drop |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for m in methods:
        cells = " | ".join(f"{100 * average_of(report, m, c):.1f}" for c in cols)
        lines.append(f"| {LABELS[m]} | {cells} | {100 * mean_drop(report, m):.1f} |")
    ind, rec = mean_drop(report, "individual"), mean_drop(report, "recommended")
    lines += [
        "",
        "- Mean drop: clean accuracy minus the mean over the seven corruptions (points).",
        f"- Goal: the recommended configuration loses no more than the individual models plus {100 * GOAL_MARGIN:.0f} points: "
        f"{100 * rec:.1f} against {100 * ind:.1f}, {verdict_of(rec, ind)}.",
    ]
    if AUGMIX in methods:
        aug = mean_drop(report, AUGMIX)
        clean_change = average_of(report, AUGMIX, "clean") - average_of(report, "recommended", "clean")
        lines.append(
            f"- With its router fitted on AugMix views too (`--router-augment augmix`, opt-in): {100 * aug:.1f} against {100 * ind:.1f}, "
            f"{verdict_of(aug, ind)}; clean accuracy {100 * clean_change:+.1f} points against the recommended row."
        )
    worst = max(report["corruptions"], key=lambda c: average_of(report, "individual", c) - average_of(report, "recommended", c))
    lines.append(
        f"- Largest gap to the individual models: {worst.replace('_', ' ')} (recommended {100 * average_of(report, 'recommended', worst):.1f}, "
        f"individual {100 * average_of(report, 'individual', worst):.1f}); clean: {100 * average_of(report, 'recommended', 'clean'):.1f} against "
        f"{100 * average_of(report, 'individual', 'clean'):.1f}."
    )
    diag = {r["corruption"]: r for r in report["rows"] if r["method"] == "recommended" and "routing_accuracy" in r}
    aug_diag = {r["corruption"]: r for r in report["rows"] if r["method"] == AUGMIX and "routing_accuracy" in r}
    if len(diag) == len(cols):
        lines += [
            "",
            "Where the recommended configuration's loss comes from: its task router's accuracy (share of test images whose task it names) "
            "and the accuracy with each task's images sent to that task's own expert alone (reads the task: not a method).",
            "",
            "| recommended | " + " | ".join(c.replace("_", " ") for c in cols) + " | mean drop |",
            "|---|" + "---|" * (len(cols) + 1),
        ]
        shown = [(diag, f, t) for f, t in (("routing_accuracy", "routing accuracy"), ("own_expert_average", "own expert alone"), ("average", "as merged"))]
        if len(aug_diag) == len(cols):
            shown += [
                (aug_diag, "routing_accuracy", "routing accuracy, router fitted with AugMix"),
                (aug_diag, "average", "as merged, router fitted with AugMix"),
            ]
        for rows_of, field, text in shown:
            vals = [100 * rows_of[c][field] for c in cols]
            lines.append(f"| {text} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {vals[0] - sum(vals[1:]) / (len(vals) - 1):.1f} |")
        own_drop = diag["clean"]["own_expert_average"] - sum(diag[c]["own_expert_average"] for c in report["corruptions"]) / len(report["corruptions"])
        lines += [
            "",
            f"- Measured cause: with every image sent to its own expert the recommended configuration would drop {100 * own_drop:.1f} points "
            f"under corruption (the individual models: {100 * ind:.1f}); as merged it drops {100 * mean_drop(report, 'recommended'):.1f}: the rest is "
            "routing, whose accuracy falls under corruption (row above).",
        ]
    lines += [
        "- Every merge's exact `wemoe merge` arguments are in robustness.json (key `args`).",
        f"- Machine: {report['machine']}. Run time: {report['seconds']} s.",
        "",
        "![robustness](robustness.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = present_methods(report)
    cols = ["clean", *report["corruptions"]]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [100 * average_of(report, m, c) for c in cols]
        ax.bar(np.arange(len(cols)) + (i - len(methods) / 2 + 0.5) * width, vals, width, label=LABELS[m])
    ax.set_xticks(range(len(cols)), [c.replace("_", " ") for c in cols], fontsize=8)
    ax.set_ylabel("average test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, results: Path) -> None:
    (results / "robustness.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / "robustness.md").write_text(markdown(report))
    plot(report, results / "robustness.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--rerender", action="store_true", help="rewrite robustness.md and .png from the stored robustness.json (no measuring)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    if args.rerender:
        report = json.loads((args.results / "robustness.json").read_text())
    else:
        report = run(lambda m: print(m, flush=True))
    write(report, args.results)
    print(markdown(report))


__all__ = ["CORRUPTIONS", "main", "markdown", "mean_drop"]
