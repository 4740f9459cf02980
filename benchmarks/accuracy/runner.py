"""Running the accuracy table: build the zoo, merge and evaluate every row through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.accuracy.render import write_results
from benchmarks.accuracy.rows import ADAMERGING, EXTENDED_CEILINGS, EXTENDED_WEMOE, LAMBDA_GRID, MAIN_WEMOE, TIES_LAMBDA_GRID, is_extended
from benchmarks.common import REPO, cli, machine_description


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


def evaluate_report(
    model: Path, zoo: Zoo, tasks: list[str], work: Path, split: str = "test", limit: int | None = None, heads: bool = True, agnostic: bool = False
) -> dict:
    """`wemoe eval`'s JSON report (``--task-agnostic`` too when asked)."""
    out = work / "eval.json"
    specs = [f"{t}={zoo.head(t) if heads else ''}:{zoo.data(t)}" for t in tasks]
    extra = (["--limit", limit] if limit else []) + (["--task-agnostic"] if agnostic else [])
    cli("eval", model, "--task", *specs, "--split", split, "--json", out, "--quiet", "--batch-size", 128, *extra)
    return json.loads(out.read_text())


def evaluate(model: Path, zoo: Zoo, tasks: list[str], work: Path, split: str = "test", limit: int | None = None, heads: bool = True) -> dict[str, float]:
    res = evaluate_report(model, zoo, tasks, work, split, limit, heads)
    return {t: res[t]["accuracy"] for t in tasks}


def own_expert_ceiling(merged: Path, zoo: Zoo) -> dict[str, float]:
    """Each task's test images routed to its own expert only (coefficient 1, others 0).

    Not a method (it reads the task identity a router must infer): the accuracy a perfect
    router could reach with the model's non-routed weights, i.e. the configuration's ceiling.
    """
    import wemoe
    from benchmarks.zoo.routed_ceiling import own_expert_accuracy

    return own_expert_accuracy(wemoe.load(merged), {t: str(zoo.data(t)) for t in zoo.tasks})


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


def rel(path: Path) -> str:
    """A path as the args record shows it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def merge_args(zoo: Zoo, out: Path, method_flags: list) -> list[str]:
    """The whole `wemoe merge` command line (without the program name) for a merge of every zoo task."""
    flags = [str(a) for a in method_flags]
    adapts = flags[flags.index("--method") + 1] in ("wemoe", "adamerging")
    args = ["merge", "--base", rel(zoo.base), "--tasks", *[f"{t}={rel(zoo.ckpt(t))}" for t in zoo.tasks]]
    if adapts:
        args += ["--heads", *[f"{t}={rel(zoo.head(t))}" for t in zoo.tasks], "--data", *[f"{t}={rel(zoo.data(t))}" for t in zoo.tasks]]
    return args + flags + ["--out", rel(out), "--force", "--quiet"]


def run_merge(zoo: Zoo, out: Path, method_flags: list) -> tuple[list[str], float]:
    args = merge_args(zoo, out, method_flags)
    t0 = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(REPO)  # the recorded relative paths are what runs
    try:
        cli(*args)
    finally:
        os.chdir(cwd)
    return args, round(time.perf_counter() - t0, 1)


def wemoe_row(zoo: Zoo, work: Path, key: str, label_text: str, flags: list, keep: Path | None = None, ceiling: bool = False) -> dict:
    out = keep or work / "merged"
    args, seconds = run_merge(zoo, out, flags)
    cfg = json.loads((out / "config.json").read_text())
    ad = cfg["wemoe"]["adaptation"]
    report = evaluate_report(out, zoo, zoo.tasks, work, heads=False, agnostic=True)  # one pass: own heads, and the task not named
    r = row(
        {t: report[t]["accuracy"] for t in zoo.tasks},
        label=label_text,
        args=args,
        seconds=seconds,
        steps=ad["steps"],
        initial_loss=ad["initial_loss"],
        final_loss=ad["final_loss"],
        warnings=ad["warnings"],
        objective=ad["objective"],
        router_fit=cfg["wemoe"].get("router_fit"),
    )
    r["routing_accuracy"] = row({t: report[t]["task_accuracy"] for t in zoo.tasks})
    r["joint_accuracy"] = row({t: report[t]["joint_accuracy"] for t in zoo.tasks})
    r["predicted"] = {t: report[t]["predicted"] for t in zoo.tasks}
    if ceiling:
        r["own_expert"] = row(own_expert_ceiling(out, zoo))
    return r


def without_out(args: list) -> tuple[str, ...]:
    """A recorded command line less its scratch output directory (what identifies the merge)."""
    args = [str(a) for a in args]
    i = args.index("--out")
    return tuple(args[:i] + args[i + 2 :])


def carried_rows(zoo: Zoo, rows: dict[str, tuple[str, list]], earlier: dict[str, dict], machine: str | None, log) -> dict[str, dict]:
    """Earlier measurements of the extended rows not rerun, matched by their exact `wemoe merge` arguments.

    A row is carried over only when an earlier row (under any name: rows get renamed)
    recorded the same arguments; `benchmarks.output_hashes` is what shows that those
    arguments still write the same bytes. Each keeps the machine that measured it.
    """
    out: dict[str, dict] = {}
    by_args = {without_out(m["args"]): (k, m) for k, m in earlier.items() if m.get("args") and not m.get("diagnostic")}
    for key, (text, flags) in rows.items():
        found = by_args.get(without_out(merge_args(zoo, Path("merged"), flags)))
        if found is None:
            log(f"  {key}: not run and never measured with these arguments: left out")
            continue
        old_key, m = found
        out[key] = {**m, "label": text, "machine": m.get("machine", machine or "not recorded"), "carried": True}
        ceiling = earlier.get(f"{old_key}-own-expert")
        if key in EXTENDED_CEILINGS and ceiling:
            out[f"{key}-own-expert"] = {**ceiling, "machine": out[key]["machine"], "carried": True}
        log(f"  {key}: carried over from the earlier row {old_key} (same arguments, measured on {out[key]['machine']})")
    return out


def run(quick: bool, results_dir: Path, cache: Path | None, extended: bool, only: list[str] | None = None) -> dict:
    from benchmarks.zoo import build as zoo_build
    from benchmarks.zoo import datasets as zoo_data
    from benchmarks.zoo import requirements

    requirements.ensure()  # Debian's Fashion-MNIST and fonts: installed as root, else one line saying how
    started = time.perf_counter()
    log = lambda m: print(m, flush=True)
    cache = cache or Path(zoo_build.QUICK_CACHE if quick else zoo_build.DEFAULT_CACHE)
    stem = "accuracy_quick" if quick else "accuracy"
    previous = json.loads((results_dir / f"{stem}.json").read_text()) if (results_dir / f"{stem}.json").exists() else {}
    log(f"[1/5] zoo: {cache}")
    zoo_build.build(str(cache), quick=quick)
    zoo = Zoo(cache, list(zoo_data.TASKS))
    methods: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="wemoe-acc-"))
    try:
        if extended:  # the second command: WEMoE variants; the main job's rows are kept from the last main run
            earlier = previous.get("methods", {})
            # the main job's rows as the last main run measured them, on its machine
            methods = {k: {**v, "machine": v.get("machine", previous.get("machine", "not recorded"))} for k, v in earlier.items() if not is_extended(k)}
            command = "python -m benchmarks.accuracy --extended"
            chosen = {k: v for k, v in EXTENDED_WEMOE.items() if not only or k in only}
            methods.update(carried_rows(zoo, {k: v for k, v in EXTENDED_WEMOE.items() if k not in chosen}, earlier, previous.get("machine"), log))
            for i, (key, (text, flags)) in enumerate(chosen.items()):
                log(f"[{i + 1}/{len(chosen)}] {text}")
                methods[key] = wemoe_row(zoo, work, key, text, flags, ceiling=key in EXTENDED_CEILINGS)
                methods[key]["command"] = command
                if "own_expert" in methods[key]:
                    methods[f"{key}-own-expert"] = {**methods[key].pop("own_expert"), "diagnostic": True, "args": methods[key]["args"], "command": command}
                log(f"  -> {100 * methods[key]['average']:.1f}")
        elif only:  # some WEMoE rows of the main job again; every other row carried over as it was measured
            methods = rerun_main_wemoe(zoo, work, cache, previous, only, log)
        else:
            methods = main_rows(zoo, work, cache, quick, results_dir, log)
            methods.update({k: v for k, v in previous.get("methods", {}).items() if is_extended(k) and not quick})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for m in methods.values():
        m.setdefault("machine", machine_description())  # rows carried over keep the machine that measured them
    report = {
        "tasks": zoo.tasks,
        "methods": methods,
        "quick": quick,
        "seconds": previous.get("seconds") if extended or only else round(time.perf_counter() - started, 1),
        # a full --extended run's time; an --only run keeps it and says what its own rows took
        "extended_seconds": round(time.perf_counter() - started, 1) if extended and not only else previous.get("extended_seconds"),
        **({"only_seconds": round(time.perf_counter() - started, 1), "only_rows": list(only)} if only else {}),
        "zoo": json.loads((cache / "results.json").read_text()).get("recipe") if (cache / "results.json").exists() else None,
        "machine": machine_description(),
    }
    if extended and previous.get("machine", report["machine"]) != report["machine"]:
        report["machine"] = f"main rows: {previous.get('machine', 'not recorded')}; --extended rows: {report['machine']}"
    write_results(report, results_dir, stem)
    return report


MAIN_KEYS = ("pretrained", "individual", "average", "task-arithmetic", "task-arithmetic-0.3", "ties", *ADAMERGING, *MAIN_WEMOE)


def rerun_main_wemoe(zoo: Zoo, work: Path, cache: Path, previous: dict, only: list[str], log) -> dict[str, dict]:
    """The main job's WEMoE rows in ``only`` merged and evaluated again; the other rows of the last results kept,
    marked with the machine that measured them (`benchmarks.output_hashes` shows their arguments still write the same bytes)."""
    earlier = previous.get("methods", {})
    if "task-arithmetic" not in earlier:
        raise SystemExit("--only needs the results of a full run to keep the other rows from: run python -m benchmarks.accuracy first")
    methods = {}
    for key, m in earlier.items():
        if key.removesuffix("-own-expert") in MAIN_KEYS and key.removesuffix("-own-expert") not in only:
            methods[key] = {**m, "carried": True, "machine": m.get("machine", previous.get("machine", "not recorded"))}
        elif is_extended(key):
            methods[key] = m
    for key in only:
        text, flags = MAIN_WEMOE[key]
        log(f"[{key}] {text}")
        methods[key] = wemoe_row(zoo, work, key, text, [*flags, "--lambda", earlier["task-arithmetic"]["lambda"]], keep=cache / key, ceiling=True)
        methods[f"{key}-own-expert"] = {**methods[key].pop("own_expert"), "diagnostic": True, "args": methods[key]["args"]}
        log(f"  -> {100 * methods[key]['average']:.1f}")
    return methods


def smoke_steps(flags: list) -> list:
    """--quick is a smoke test: at most 20 adaptation steps."""
    return [min(f, 20) if i and flags[i - 1] == "--steps" else f for i, f in enumerate(flags)]


def main_rows(zoo: Zoo, work: Path, cache: Path, quick: bool, results_dir: Path, log) -> dict[str, dict]:
    val_limit = 100 if quick else 300
    methods: dict[str, dict] = {}
    log("[2/5] pretrained and individual models")
    methods["pretrained"] = row(evaluate(zoo.base, zoo, zoo.tasks, work), args=None)
    methods["individual"] = row({t: evaluate(zoo.ckpt(t), zoo, [t], work)[t] for t in zoo.tasks}, args=None)
    log("[3/5] static merges")

    def static_row(flags: list, **extra) -> dict:
        args, seconds = run_merge(zoo, work / "merged", flags)
        return row(evaluate(work / "merged", zoo, zoo.tasks, work), args=args, seconds=seconds, **extra)

    methods["average"] = static_row(["--method", "average"])
    best, scores = pick_lambda(zoo, work, "task-arithmetic", LAMBDA_GRID, val_limit, log)
    methods["task-arithmetic"] = static_row(["--method", "task-arithmetic", "--lambda", best], **{"lambda": best, "validation": scores})
    methods["task-arithmetic-0.3"] = static_row(["--method", "task-arithmetic", "--lambda", 0.3], **{"lambda": 0.3})
    tbest, tscores = pick_lambda(zoo, work, "ties", TIES_LAMBDA_GRID, val_limit, log)
    methods["ties"] = static_row(["--method", "ties", "--lambda", tbest], **{"lambda": tbest, "ties_k": 20, "validation": tscores})
    log("[4/5] AdaMerging (coefficients adapted on the unlabeled test images)")
    for key, (text, flags) in ADAMERGING.items():
        methods[key] = static_row(smoke_steps(flags) if quick else flags, label=text)
    log("[5/5] WEMoE")
    for key, (text, flags) in MAIN_WEMOE.items():
        flags = [*flags, "--lambda", best]
        if quick:
            flags = smoke_steps(flags)
        keep = cache / key  # kept: `wemoe.load("benchmarks/cache/zoo/wemoe")` works after the run
        methods[key] = wemoe_row(zoo, work, key, text, flags, keep=keep, ceiling=True)
        methods[f"{key}-own-expert"] = {**methods[key].pop("own_expert"), "diagnostic": True, "args": methods[key]["args"]}
        log(f"  {text}: {100 * methods[key]['average']:.1f}")
    heat = results_dir / ("routing_quick.png" if quick else "routing.png")
    cli(
        "routes",
        cache / "wemoe",
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
    return methods
