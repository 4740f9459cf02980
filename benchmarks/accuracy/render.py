"""The accuracy table as markdown, JSON, a plot and the README's generated block."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.accuracy.rows import EXTENDED_WEMOE
from benchmarks.common import RESULTS, replace_readme_block
from wemoe.moe.block import DEFAULT_COEF_GUARD

ORDER = [
    "pretrained",
    "individual",
    "average",
    "task-arithmetic-0.3",
    "task-arithmetic",
    "ties",
    "adamerging-task",
    "adamerging-layer",
    "wemoe",
    "wemoe-own-expert",
    *[k for key in EXTENDED_WEMOE for k in (key, f"{key}-own-expert")],
    "wemoe-best",
    "wemoe-best-own-expert",
]


def label(name: str, m: dict) -> str:
    if name == "task-arithmetic":
        return f"task arithmetic (best lambda {m['lambda']})"
    if name == "task-arithmetic-0.3":
        return "task arithmetic (lambda 0.3)"
    if name == "ties":
        return f"TIES (k 20%, lambda {m['lambda']})"
    if name.endswith("-own-expert"):
        return "*ceiling of the row above: each task routed to its own expert (reads the task; not a method)*"
    if "label" in m:
        return m["label"] + (" (`--extended`)" if m.get("command") else "")
    return {"pretrained": "pretrained (base + prototype heads)", "individual": "individual fine-tuned", "average": "simple average"}.get(name, name)


def guard_of(m: dict) -> str:
    """The coefficient guard a row was merged with, read from its recorded arguments."""
    args = [str(a) for a in m.get("args", [])]
    return args[args.index("--coef-guard") + 1] if "--coef-guard" in args else DEFAULT_COEF_GUARD


def markdown(report: dict) -> str:
    tasks, methods = report["tasks"], report["methods"]
    head = "| method | " + " | ".join(tasks) + " | **avg** | routing acc. |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for name in ORDER:
        if name in methods:
            m = methods[name]
            cells = " | ".join(f"{100 * m['per_task'][t]:.1f}" for t in tasks)
            routed = f"{100 * m['routing_accuracy']['average']:.1f}%" if "routing_accuracy" in m else ""
            lines.append(f"| {label(name, m)} | {cells} | **{100 * m['average']:.1f}** | {routed} |")
    ind = methods["individual"]["average"]
    notes = []
    if "task-arithmetic" in methods and "pretrained" in methods:
        ta, pre = methods["task-arithmetic"]["average"], methods["pretrained"]["average"]
        notes.append(
            f"- Task arithmetic (best lambda) is {100 * (ta - pre):+.1f} points against the pretrained base and {100 * (ta - ind):+.1f} against the individual models."
        )
        for key in ("adamerging-layer", "wemoe", "wemoe-best"):
            if key in methods:
                w = methods[key]["average"]
                notes.append(
                    f"- {label(key, methods[key])}: {100 * w / ind:.1f}% of the individual models' average, {100 * (w - ta):+.1f} points against task arithmetic (best lambda)."
                )
    for key in ("wemoe", "wemoe-best"):
        if key in methods:
            m = methods[key]
            notes.append(
                f"- {key}: {m['steps']} adaptation steps, merge {m['seconds']} s; loss {m['initial_loss']:.3f} -> {m['final_loss']:.3f} ({m['objective']})"
                + (f"; warnings: {'; '.join(m['warnings'])}" if m["warnings"] else "; no collapse warnings.")
            )
    if "wemoe-best" in methods and "task-arithmetic" in methods and "wemoe-best-own-expert" in methods:
        b, c, ta = methods["wemoe-best"]["average"], methods["wemoe-best-own-expert"]["average"], methods["task-arithmetic"]["average"]
        goal = max(0.97 * ind, ta + 0.15)
        notes.append(
            f"- Goal (>= 97% of the individual models and >= task arithmetic + 15, i.e. >= {100 * goal:.1f}): the recommended row reaches "
            f"{100 * b:.1f} ({'met' if b >= goal else f'{100 * (goal - b):.1f} points short'}). Where the rest goes, measured: the configuration's "
            f"ceiling with perfect routing is {100 * c:.1f} ({100 * (ind - c):.1f} points below the individual models: what merging the "
            f"non-routed weights by task arithmetic and truncating the task vectors costs), and its routers lose {100 * (c - b):.1f} points "
            f"to imperfect routing ({100 * methods['wemoe-best']['routing_accuracy']['average']:.1f}% of test images routed mainly to their own expert)."
        )
        if "wemoe-task-dense-own-expert" in methods:
            dense = methods["wemoe-task-dense-own-expert"]["average"]
            notes.append(
                f"- The ceiling's gap, split: the same groups with dense task vectors (`--extended` ceiling row) reach {100 * dense:.1f}, "
                f"so truncation to the configured rank costs {100 * (dense - c):.1f} points and the weights no router reaches "
                f"(embeddings, norms, the final projection, merged by task arithmetic) {100 * (ind - dense):.1f}."
            )
        if "wemoe-task-dense" in methods:
            d = methods["wemoe-task-dense"]
            notes.append(
                f"- With dense experts instead (`--extended` row): {100 * d['average']:.1f}, {100 * d['routing_accuracy']['average']:.1f}% routed mainly "
                f"to the own expert, merge {d['seconds']} s against {methods['wemoe-best']['seconds']} s."
            )
    if "wemoe-best" in methods and "wemoe-best-longer" in methods:
        b, longer = methods["wemoe-best"], methods["wemoe-best-longer"]
        notes.append(
            f"- Adapting longer (`--extended` row): {longer['steps']} steps reach {100 * longer['average']:.1f} "
            f"({100 * longer['routing_accuracy']['average']:.1f}% routed mainly to the own expert) against {100 * b['average']:.1f} "
            f"after {b['steps']}, merge {longer['seconds']} s against {b['seconds']} s; the recommended row keeps {b['steps']} steps "
            "so that the main job fits its 20-minute budget."
        )
    guard_pairs = [(k, v) for k, v in (("wemoe", "wemoe-straight-through"), ("wemoe-best", "wemoe-best-clamp")) if k in methods and v in methods]
    if guard_pairs:
        notes.append(
            "- Coefficient guard (`--coef-guard`; clamp is the default, the recommended row uses straight-through): "
            + "; ".join(
                f"{k} {100 * methods[k]['average']:.1f} ({guard_of(methods[k])}) vs {100 * methods[v]['average']:.1f} ({guard_of(methods[v])})"
                for k, v in guard_pairs
            )
            + "."
        )
    notes.append(
        "- Every merged row records its exact `wemoe merge` arguments in accuracy.json (key `args`); ceiling rows read the task at "
        'evaluation and carry `"diagnostic": true`. Routing acc.: share of test images (200 per task) whose mean coefficient '
        "vector peaks at their own task's expert."
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
    times = [f"- Machine: {report.get('machine', 'not recorded')}."] + [
        f"- Run time: {report['seconds']} s (`python -m benchmarks.accuracy{' --quick' if report['quick'] else ''}`)."
    ]
    if report.get("extended_seconds"):
        times.append(
            f"- Rows marked `--extended`: `python -m benchmarks.accuracy --extended` ({report['extended_seconds']} s; the main job's 20-minute budget has no room for them)."
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
            *times,
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
    body = markdown(report).split("\n", 2)[2].strip()
    figures = [
        "![accuracy](benchmarks/results/accuracy.png)",
        "",
        "Routing on the zoo (mean routing weight per block and expert, per task's data): ![routing heatmap](benchmarks/results/routing.png)",
    ]
    replace_readme_block("accuracy", "\n".join([body, "", *figures]))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = report["tasks"] + ["avg"]
    names = [n for n in ORDER if n in report["methods"] and not report["methods"][n].get("diagnostic") and not report["methods"][n].get("command")]
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
