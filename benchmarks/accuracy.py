"""The accuracy table over the embedded zoo: every method, every task.

    python -m benchmarks.accuracy            # full run (the README's main job)
    python -m benchmarks.accuracy --quick    # CI-sized

Builds the zoo if it is not cached, then runs the real `wemoe merge` and
`wemoe eval` commands for: the pretrained base, each individual fine-tuned
model, simple average, task arithmetic (lambda chosen on a grid using labelled
TRAIN images, and lambda 0.3), TIES, and WEMoE (routers adapted on the unlabeled
TEST images, as test-time adaptation does). Writes accuracy.md/.json/.png to
benchmarks/results/ (or --results).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from wemoe.cli import main as wemoe_main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LAMBDA_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
TIES_LAMBDA_GRID = (0.3, 0.5, 0.7, 1.0, 1.5)
# Router adaptation: 100 steps at 3e-4 fit the 20-minute budget; of the three settings measured on
# this zoo (ATTEMPTS.md, attempt 4) it was the best, and all three were within 1 point.
ADAPT_LR = 3e-4


def cli(*args) -> None:
    """The real CLI, in-process; its stdout tables are dropped (the JSON reports are read)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            wemoe_main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"wemoe {' '.join(map(str, args[:2]))} failed with exit {exc.code}") from None


class Zoo:
    def __init__(self, cache: Path, tasks: list[str]):
        self.cache, self.tasks = cache, tasks
        self.base = cache / "base.safetensors"

    def ckpt(self, t: str) -> Path:
        return self.cache / "tasks" / f"{t}.safetensors"

    def head(self, t: str) -> Path:
        return self.cache / "heads" / f"head_{t}.safetensors"

    def data(self, t: str) -> Path:
        return self.cache / "data" / f"{t}.npz"


def evaluate(model: Path, zoo: Zoo, tasks: list[str], work: Path, split: str = "test", limit: int | None = None, heads: bool = True) -> dict[str, float]:
    out = work / "eval.json"
    specs = [f"{t}={zoo.head(t) if heads else ''}:{zoo.data(t)}" for t in tasks]
    extra = ["--limit", limit] if limit else []
    cli("eval", model, "--task", *specs, "--split", split, "--json", out, "--quiet", "--batch-size", 128, *extra)
    res = json.loads(out.read_text())
    return {t: res[t]["accuracy"] for t in tasks}


def own_expert_ceiling(merged: Path, zoo: Zoo) -> dict[str, float]:
    """Each task's test images routed to its own expert only (coefficient 1, others 0).

    Not a method (it reads the task identity a router must infer): the accuracy a perfect
    router could reach given the task-arithmetic non-MLP weights, i.e. WEMoE's ceiling here.
    """
    import torch

    import wemoe
    from wemoe.data import load_data
    from wemoe.evaluate import evaluate_task

    model = wemoe.load(merged)
    out = {}
    for t in zoo.tasks:
        onehot = torch.zeros(len(model.task_names))
        onehot[model.task_names.index(t)] = 1.0
        with model.fixed_routing(onehot):
            out[t] = evaluate_task(model, model.heads[t], load_data(zoo.data(t), "test"), model.arch, batch_size=128, progress=False).accuracy
    return out


def static(zoo: Zoo, work: Path, method: str, *extra) -> Path:
    out = work / "merged"
    cli("merge", "--base", zoo.base, "--tasks", *[f"{t}={zoo.ckpt(t)}" for t in zoo.tasks], "--method", method, "--out", out, "--force", "--quiet", *extra)
    return out


def row(per_task: dict[str, float], **extra) -> dict:
    return {"per_task": per_task, "average": sum(per_task.values()) / len(per_task), **extra}


def pick_lambda(zoo: Zoo, work: Path, method: str, grid, val_limit: int, log) -> tuple[float, dict[float, float]]:
    """Best lambda by average accuracy on labelled TRAIN images (a validation set, not the test set)."""
    scores = {}
    for lam in grid:
        merged = static(zoo, work, method, "--lambda", lam)
        scores[lam] = row(evaluate(merged, zoo, zoo.tasks, work, split="train", limit=val_limit))["average"]
        log(f"  {method} lambda {lam}: validation average {100 * scores[lam]:.1f}")
    return max(scores, key=scores.get), scores


def run(quick: bool, results_dir: Path, steps: int | None, cache: Path | None) -> dict:
    from benchmarks.zoo import build as zoo_build
    from benchmarks.zoo import datasets as zoo_data
    from benchmarks.zoo import requirements

    requirements.ensure()  # Debian's Fashion-MNIST and fonts: installed as root, else one line saying how
    started = time.perf_counter()
    log = lambda m: print(m, flush=True)
    cache = cache or Path(zoo_build.QUICK_CACHE if quick else zoo_build.DEFAULT_CACHE)
    log(f"[1/4] zoo: {cache}")
    zoo_build.build(str(cache), quick=quick)
    zoo = Zoo(cache, list(zoo_data.TASKS))
    val_limit = 100 if quick else 300
    methods: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="wemoe-acc-"))
    try:
        log("[2/4] pretrained and individual models")
        methods["pretrained"] = row(evaluate(zoo.base, zoo, zoo.tasks, work))
        methods["individual"] = row({t: evaluate(zoo.ckpt(t), zoo, [t], work)[t] for t in zoo.tasks})
        log("[3/4] static merges")
        methods["average"] = row(evaluate(static(zoo, work, "average"), zoo, zoo.tasks, work))
        best, scores = pick_lambda(zoo, work, "task-arithmetic", LAMBDA_GRID, val_limit, log)
        methods["task-arithmetic"] = row(
            evaluate(static(zoo, work, "task-arithmetic", "--lambda", best), zoo, zoo.tasks, work), **{"lambda": best, "validation": scores}
        )
        methods["task-arithmetic-0.3"] = row(evaluate(static(zoo, work, "task-arithmetic", "--lambda", 0.3), zoo, zoo.tasks, work), **{"lambda": 0.3})
        tbest, tscores = pick_lambda(zoo, work, "ties", TIES_LAMBDA_GRID, val_limit, log)
        methods["ties"] = row(
            evaluate(static(zoo, work, "ties", "--lambda", tbest), zoo, zoo.tasks, work), **{"lambda": tbest, "ties_k": 20, "validation": tscores}
        )
        log("[4/4] WEMoE (router test-time adaptation on unlabeled test images)")
        n_steps = steps if steps is not None else (60 if quick else 100)
        wemoe_args = ["--method", "wemoe", "--lambda", best, "--steps", n_steps, "--lr", ADAPT_LR, "--batch-size", 16, "--seed", 0]
        t0 = time.perf_counter()
        merged = cache / "wemoe"  # kept: `wemoe.load("benchmarks/cache/zoo/wemoe")` works after the run
        cli(
            "merge",
            "--base",
            zoo.base,
            "--tasks",
            *[f"{t}={zoo.ckpt(t)}" for t in zoo.tasks],
            "--heads",
            *[f"{t}={zoo.head(t)}" for t in zoo.tasks],
            "--data",
            *[f"{t}={zoo.data(t)}" for t in zoo.tasks],
            "--out",
            merged,
            "--force",
            *wemoe_args,
        )
        adapt_s = time.perf_counter() - t0
        cfg = json.loads((merged / "config.json").read_text())
        methods["wemoe"] = row(
            evaluate(merged, zoo, zoo.tasks, work, heads=False),
            steps=n_steps,
            seconds=round(adapt_s, 1),
            final_loss=cfg["wemoe"]["adaptation"]["final_loss"],
            initial_loss=cfg["wemoe"]["adaptation"]["initial_loss"],
            warnings=cfg["wemoe"]["adaptation"]["warnings"],
        )
        methods["wemoe-own-expert"] = row(own_expert_ceiling(merged, zoo))
        heat = results_dir / ("routing_quick.png" if quick else "routing.png")
        cli(
            "routes",
            merged,
            "--task",
            *[f"{t}={zoo.data(t)}" for t in zoo.tasks],
            "--png",
            heat,
            "--json",
            heat.with_suffix(".json"),
            "--limit",
            200,
            "--quiet",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "tasks": zoo.tasks,
        "methods": methods,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
        "zoo": json.loads((cache / "results.json").read_text()).get("recipe") if (cache / "results.json").exists() else None,
    }
    write_results(report, results_dir, "accuracy_quick" if quick else "accuracy")
    return report


ORDER = ["pretrained", "individual", "average", "task-arithmetic-0.3", "task-arithmetic", "ties", "wemoe", "wemoe-own-expert"]


def label(name: str, m: dict) -> str:
    if name == "task-arithmetic":
        return f"task arithmetic (best lambda {m['lambda']})"
    if name == "task-arithmetic-0.3":
        return "task arithmetic (lambda 0.3)"
    if name == "ties":
        return f"TIES (k 20%, lambda {m['lambda']})"
    if name == "wemoe":
        return "WEMoE (per-sample routing)"
    if name == "wemoe-own-expert":
        return "*ceiling: WEMoE with each task routed to its own expert (not a method)*"
    return {"pretrained": "pretrained (base + prototype heads)", "individual": "individual fine-tuned", "average": "simple average"}.get(name, name)


def markdown(report: dict) -> str:
    tasks, methods = report["tasks"], report["methods"]
    head = "| method | " + " | ".join(tasks) + " | **avg** |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for name in ORDER:
        if name in methods:
            m = methods[name]
            cells = " | ".join(f"{100 * m['per_task'][t]:.1f}" for t in tasks)
            lines.append(f"| {label(name, m)} | {cells} | **{100 * m['average']:.1f}** |")
    ind = methods["individual"]["average"]
    notes = []
    if "wemoe" in methods and "task-arithmetic" in methods:
        w, ta, pre = methods["wemoe"]["average"], methods["task-arithmetic"]["average"], methods["pretrained"]["average"]
        notes += [
            f"- WEMoE reaches {100 * w / ind:.1f}% of the individual models' average and is {100 * (w - ta):+.1f} points against task arithmetic (best lambda).",
            f"- Task arithmetic (best lambda) is {100 * (ta - pre):+.1f} points against the pretrained base and {100 * (ta - ind):+.1f} against the individual models.",
            f"- WEMoE: {methods['wemoe']['steps']} adaptation steps in {methods['wemoe']['seconds']} s; entropy loss {methods['wemoe']['initial_loss']:.3f} -> {methods['wemoe']['final_loss']:.3f}"
            + (f"; warnings: {'; '.join(methods['wemoe']['warnings'])}" if methods["wemoe"]["warnings"] else "; no collapse warnings."),
        ]
    if "wemoe-own-expert" in methods:
        c = methods["wemoe-own-expert"]["average"]
        notes.append(
            f"- Ceiling row: the same WEMoE model with every test image of a task routed to that task's expert alone "
            f"(it uses the task label a router must infer): {100 * c:.1f}, {100 * c / ind:.1f}% of the individual models. "
            "The gap to the individual models is what merging the non-MLP weights by task arithmetic costs; "
            "no router can recover it."
        )
    zoo = report.get("zoo")
    if zoo:
        d, h, f = zoo["data"], zoo["heads"], zoo["finetune"]
        notes.append(
            f"- Zoo recipe (`benchmarks/zoo/config.py`): up to {d['n_train']:,} train / {d['n_test']:,} test images per task; "
            f"prototype heads from {h['per_class']} images per class, logit scale {h['logit_scale']:g}; fine-tuning AdamW "
            f"lr {f['lr']:g}, {f['steps']} steps of {f['batch']} images"
            + (f", plus {f['replay_batch']} pretraining-distribution replay images per step at alpha {f['replay_alpha']:g}" if f.get("replay_alpha") else "")
            + ". Every attempt and its numbers: `benchmarks/zoo/ATTEMPTS.md`."
        )
    return "\n".join(
        [
            f"# Accuracy on the embedded zoo{' (quick)' if report['quick'] else ''}",
            "",
            "Test accuracy (%) per task, each merged encoder evaluated with each task's own head. "
            "Generated by `python -m benchmarks.accuracy" + (" --quick" if report["quick"] else "") + "`; do not edit by hand.",
            "",
            *lines,
            "",
            *notes,
            "- Lambdas for task arithmetic and TIES are chosen on labelled train images (validation), never on the test set.",
            f"- Total run time: {report['seconds']} s.",
            "",
        ]
    )


def write_results(report: dict, results_dir: Path, stem: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results_dir / f"{stem}.md").write_text(markdown(report))
    plot(report, results_dir / f"{stem}.png")
    if not report["quick"] and results_dir.resolve() == RESULTS.resolve():
        update_readme(report)


def update_readme(report: dict) -> None:
    """Keep the README's table generated, never typed: replace the marked block."""
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
    if start not in text or end not in text:
        return
    body = markdown(report).split("\n", 2)[2].strip()
    block = "\n".join(
        [
            start,
            body,
            "",
            "![accuracy](benchmarks/results/accuracy.png)",
            "",
            "Routing on the zoo (mean routing weight per block and expert, per task's data): ![routing heatmap](benchmarks/results/routing.png)",
            end,
        ]
    )
    readme.write_text(text[: text.index(start)] + block + text[text.index(end) + len(end) :])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = report["tasks"] + ["avg"]
    names = [n for n in ORDER if n in report["methods"] and n != "wemoe-own-expert"]  # methods only
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(12, 4.2))
    for i, n in enumerate(names):
        m = report["methods"][n]
        vals = [100 * m["per_task"][t] for t in report["tasks"]] + [100 * m["average"]]
        ax.bar(np.arange(len(tasks)) + (i - len(names) / 2 + 0.5) * width, vals, width, label=label(n, m))
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: small zoo, few adaptation steps")
    ap.add_argument("--steps", type=int, default=None, help="WEMoE adaptation steps (default 100 at lr 3e-4, to fit the 20-minute budget on 2 cores; quick 60)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    run(args.quick, args.results, args.steps, args.cache)
    print()
    print((args.results / ("accuracy_quick.md" if args.quick else "accuracy.md")).read_text())


if __name__ == "__main__":
    main()
