"""Held-out tasks and other task mixes: what merged models do with images of tasks they have no expert for.

For each split of the zoo's tasks into merged ("seen") and held-out ones, every method
merges only the seen tasks; seen tasks are evaluated as usual and held-out tasks with
their own heads on the merged encoder (no expert of theirs exists), against task
arithmetic and the pretrained base, as the WEMoE paper's generalisation table does.
The seen-task averages double as the check that the recommended configuration holds
on other task mixes than the full eight.

    python -m benchmarks.generalization      # ~15 minutes on 2 cores with the zoo built

Writes benchmarks/results/generalization.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.accuracy import BEST, PAPER, RESULTS, Zoo, evaluate, row, run_merge
from benchmarks.accuracy.runner import merge_args, without_out

TASKS = ("fashion", "mnist", "digits8", "letters", "housenum", "textures", "shapes", "counting")
# held-out pairs: the two generated scenes, and a photo-like task with a font task (letters is the one the routers
# most confuse with another, housenum); two splits keep the run near 15 minutes on 2 cores
SPLITS = (("shapes", "counting"), ("fashion", "letters"))
UNSEEN_BASE = (
    "WEMoE, recommended, with images of no merged task served by the base model (--unseen base)",
    [*BEST[1], "--unseen", "base"],
)
METHODS = {
    "task-arithmetic": ("task arithmetic (lambda 0.3)", ["--method", "task-arithmetic", "--lambda", 0.3]),
    "wemoe": PAPER,
    "wemoe-best": BEST,
    "wemoe-best-unseen-base": UNSEEN_BASE,
}


@torch.no_grad()
def routing_spread(merged: Path, zoo: Zoo, tasks: list[str], limit: int = 200) -> dict[str, float]:
    """Mean largest routing coefficient (averaged over routed groups) on each task's test images: how decidedly
    images are sent to one expert (held-out images have no right one)."""
    import wemoe
    from wemoe.data import load_data

    model = wemoe.load(merged)
    out = {}
    for t in tasks:
        data = load_data(zoo.data(t), "test").subset(limit)
        tops = [torch.stack(model.routing(x)).mean(0).max(-1).values for x, _ in data.batches(100, model.arch)]
        out[t] = float(torch.cat(tops).mean())
    return out


@torch.no_grad()
def unseen_share(merged: Path, zoo: Zoo, tasks: list[str]) -> dict[str, float]:
    """Share of each task's test images the model serves as belonging to none of its tasks."""
    import wemoe
    from wemoe.data import load_data
    from wemoe.model.vit import RoutingTrace

    model = wemoe.load(merged)
    out = {}
    for t in tasks:
        flags = []
        for x, _ in load_data(zoo.data(t), "test").batches(128, model.arch):
            trace = RoutingTrace()
            model.encode(x, trace)
            flags.append(trace.unseen.float())
        out[t] = float(torch.cat(flags).mean())
    return out


def run_split(zoo_all: Zoo, held_out: tuple[str, ...], work: Path, log, only: set[str] | None = None, previous: dict | None = None) -> dict:
    """Every row of one split; with ``only``, the other rows are carried over from ``previous`` (the same split's
    last results) where their recorded arguments are the ones this code would run."""
    seen = [t for t in zoo_all.tasks if t not in held_out]
    zoo = Zoo(zoo_all.cache, seen)
    result = {"seen": seen, "held_out": list(held_out), "methods": {}}
    old = (previous or {}).get("methods", {})
    if only and "pretrained" in old and "individual" in old:
        result["methods"]["pretrained"], result["methods"]["individual"] = old["pretrained"], old["individual"]
    else:
        result["methods"]["pretrained"] = row(evaluate(zoo.base, zoo_all, zoo_all.tasks, work))
        result["methods"]["individual"] = row({t: evaluate(zoo.ckpt(t), zoo_all, [t], work)[t] for t in seen})
    for key, (text, flags) in METHODS.items():
        out = work / key
        if only and key not in only and key in old and without_out(old[key].get("args", ["--out", ""])) == without_out(merge_args(zoo, out, flags)):
            result["methods"][key] = {**old[key], "carried": True}
            log(f"  {text}: carried over (same arguments)")
            continue
        args, seconds = run_merge(zoo, out, flags)
        acc = evaluate(out, zoo_all, zoo_all.tasks, work)  # every task with its own head (the zoo's head files)
        r = {
            "label": text,
            "args": args,
            "seconds": seconds,
            "per_task": acc,
            "seen_average": sum(acc[t] for t in seen) / len(seen),
            "held_out_average": sum(acc[t] for t in held_out) / len(held_out),
        }
        if key != "task-arithmetic":
            r["top_coefficient"] = routing_spread(out, zoo_all, zoo_all.tasks)
        if key == "wemoe-best-unseen-base":
            r["flagged_unseen"] = unseen_share(out, zoo_all, zoo_all.tasks)
        result["methods"][key] = r
        log(f"  {text}: seen {100 * r['seen_average']:.1f}, held-out {100 * r['held_out_average']:.1f}")
        shutil.rmtree(out, ignore_errors=True)
    return result


def markdown(report: dict) -> str:
    lines = [
        "# Held-out tasks and other task mixes",
        "",
        "Each split merges the zoo's other six tasks; held-out tasks are evaluated with their own heads on the merged encoder "
        "(no expert of theirs exists). WEMoE rows as in accuracy.md (paper: test-time adaptation on the seen tasks' test images; "
        "recommended: a task router fitted on the seen tasks' train split; `--unseen base`: images its detector (per-task Gaussians on "
        "the features the task router reads) says belong to no merged task, calibrated to keep 99% of the seen tasks' held-back train "
        "images, get the base model). Top coefficient: the mean largest routing coefficient on a task's test images (1 = all weight on "
        "one expert). Rows marked † were carried over from an earlier run with the same arguments (`--only`). Generated by "
        "`python -m benchmarks.generalization`; do not edit by hand.",
        "",
    ]
    for split in report["splits"]:
        seen, held = split["seen"], split["held_out"]
        m = split["methods"]
        ind = sum(m["individual"]["per_task"].values()) / len(seen)
        lines += [
            f"## Held out: {', '.join(held)}",
            "",
            "| method | seen avg | % of individual | " + " | ".join(f"{t} (held out)" for t in held) + " | held-out avg | top coef. seen / held out |",
            "|---|" + "---|" * (len(held) + 4),
            f"| pretrained | {100 * sum(m['pretrained']['per_task'][t] for t in seen) / len(seen):.1f} | | "
            + " | ".join(f"{100 * m['pretrained']['per_task'][t]:.1f}" for t in held)
            + f" | {100 * sum(m['pretrained']['per_task'][t] for t in held) / len(held):.1f} | |",
            f"| individual (seen tasks) | {100 * ind:.1f} | 100% | " + " | ".join("" for _ in held) + " | | |",
        ]
        for key in METHODS:
            r = m[key]
            tops = r.get("top_coefficient")
            top = f"{sum(tops[t] for t in seen) / len(seen):.2f} / {sum(tops[t] for t in held) / len(held):.2f}" if tops else ""
            lines.append(
                f"| {r['label']}{' †' if r.get('carried') else ''} | {100 * r['seen_average']:.1f} | {100 * r['seen_average'] / ind:.1f}% | "
                + " | ".join(f"{100 * r['per_task'][t]:.1f}" for t in held)
                + f" | {100 * r['held_out_average']:.1f} | {top} |"
            )
        lines += ["", goal_line(split), ""]
    lines += ["![generalization](generalization.png)", "", f"Run time {report['seconds']} s."]
    return "\n".join(lines) + "\n"


def goal_line(split: dict) -> str:
    """The goals on this split: seen tasks >= 97% of the individual models and >= task arithmetic + 13; with --unseen base,
    held-out tasks within 1 point of the base model while the seen tasks lose at most 0.5 points."""
    m, seen, held = split["methods"], split["seen"], split["held_out"]
    ind = sum(m["individual"]["per_task"].values()) / len(seen)
    ta, best = m["task-arithmetic"]["seen_average"], m["wemoe-best"]["seen_average"]
    goal = max(0.97 * ind, ta + 0.13)
    verdict = lambda value, target: "met" if value >= target - 1e-9 else f"{100 * (target - value):.1f} points short"
    text = (
        f"Goal on the seen tasks (>= 97% of the individual models, >= task arithmetic + 13: >= {100 * goal:.1f}): "
        f"recommended {100 * best:.1f}, {verdict(best, goal)}; it is {100 * (best - ta):+.1f} against task arithmetic"
    )
    if ta + 0.13 > ind:
        text += (
            f" (on this split task arithmetic + 13 is above the individual models' own {100 * ind:.1f}: no merge of them can reach it; "
            f"97% of them: {verdict(best, 0.97 * ind)})"
        )
    text += "."
    u = m.get("wemoe-best-unseen-base")
    if u:
        base_held = sum(m["pretrained"]["per_task"][t] for t in held) / len(held)
        flagged = u.get("flagged_unseen", {})
        text += (
            f" With --unseen base: held-out tasks {100 * u['held_out_average']:.1f} against the base model's {100 * base_held:.1f} "
            f"(goal within 1 point: {verdict(u['held_out_average'], base_held - 0.01)}), seen tasks {100 * u['seen_average']:.1f} against "
            f"{100 * best:.1f} without the fallback (goal at most 0.5 lower: {verdict(u['seen_average'], best - 0.005)})"
        )
        if flagged:
            text += (
                f"; images served as unseen: {100 * sum(flagged[t] for t in held) / len(held):.1f}% of the held-out tasks', "
                f"{100 * sum(flagged[t] for t in seen) / len(seen):.1f}% of the seen tasks'"
            )
        text += "."
    return text


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ["pretrained", *METHODS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    names = [" / ".join(s["held_out"]) for s in report["splits"]]
    width = 0.8 / len(keys)
    for ax, part in zip(axes, ("seen", "held_out")):
        for i, key in enumerate(keys):
            vals = []
            for s in report["splits"]:
                tasks = s[part]
                vals.append(100 * sum(s["methods"][key]["per_task"][t] for t in tasks) / len(tasks))
            label = "pretrained" if key == "pretrained" else METHODS[key][0].split(":")[0]
            ax.bar(np.arange(len(names)) + (i - len(keys) / 2 + 0.5) * width, vals, width, label=label)
        ax.set_xticks(range(len(names)), [f"held out: {n}" for n in names], fontsize=8)
        ax.set_title("seen tasks (merged)" if part == "seen" else "held-out tasks (no expert)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.zoo import build as zoo_build
    from benchmarks.zoo.quickeval import require_built

    ap = argparse.ArgumentParser(prog="python -m benchmarks.generalization", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument(
        "--held-out",
        nargs="+",
        metavar="A,B",
        default=[",".join(s) for s in SPLITS],
        help="the splits to run, each a comma-separated list of held-out tasks (default: " + " ".join(",".join(s) for s in SPLITS) + ")",
    )
    ap.add_argument(
        "--only", nargs="+", choices=list(METHODS), help="run only these rows; carry the others over from the last results where their arguments are unchanged"
    )
    args = ap.parse_args(argv)
    previous = {}
    if args.only and (args.results / "generalization.json").exists():
        previous = {tuple(s["held_out"]): s for s in json.loads((args.results / "generalization.json").read_text())["splits"]}
    splits_wanted = [tuple(s.split(",")) for s in args.held_out]
    unknown = sorted({t for s in splits_wanted for t in s} - set(TASKS))
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(TASKS)})")
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    cache = Path(zoo_build.DEFAULT_CACHE)
    require_built(str(cache))
    zoo = Zoo(cache, list(TASKS))
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="wemoe-gen-"))
    splits = []
    try:
        for held in splits_wanted:
            print(f"held out: {', '.join(held)}", flush=True)
            splits.append(run_split(zoo, held, work, lambda m: print(m, flush=True), set(args.only or ()), previous.get(held)))
            report = {"splits": splits, "seconds": round(time.perf_counter() - started, 1)}
            write(report, args.results)  # after every split: a long run stopped early keeps what it measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))


def write(report: dict, results: Path) -> None:
    (results / "generalization.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "generalization.md").write_text(markdown(report))
    plot(report, results / "generalization.png")


if __name__ == "__main__":
    main()
