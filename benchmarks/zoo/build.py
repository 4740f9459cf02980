"""``python -m benchmarks.zoo build``: data -> base -> prototype heads -> fine-tuned task models.

Cache layout (default ``benchmarks/cache/zoo``; ``--quick`` defaults to ``benchmarks/cache/zoo_quick``)::

    base.safetensors            copy of the committed base
    replay.npz                  pretraining-distribution images for the fine-tunes (replay.py)
    data/<task>.npz             x_train, y_train, x_test, y_test, classes, recipe_hash
    heads/head_<task>.safetensors
    tasks/<task>.safetensors    fine-tuned encoder, base format
    results.json                accuracies of base and fine-tuned models

Each artifact stores the hash of what it was built from and is rebuilt when that changes.
The full zoo's fine-tuned models are also committed (``benchmarks/zoo/tasks/``) and copied
when their hash matches the recipe: fine-tuning takes 11 to 21 minutes on 2 cores, and its
result differs in the last bits between CPUs (which then shows in the tables), so every
machine starts from the same task models. ``--refinetune`` fine-tunes them anew.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from . import config, datasets, replay, requirements
from .finetune import finetune
from .heads import accuracy, balanced_subset, fit_prototypes, load_head, save_head
from .model import load_encoder, load_state, save_encoder
from .pretrain import BASE_PATH

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CACHE = os.path.join(REPO, "benchmarks", "cache", "zoo")
QUICK_CACHE = os.path.join(REPO, "benchmarks", "cache", "zoo_quick")
COMMITTED_TASKS = os.path.join(REPO, "benchmarks", "zoo", "tasks")


def _meta(path: str) -> dict[str, str]:
    if not os.path.exists(path):
        return {}
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def _fresh(path: str, h: str) -> bool:
    return _meta(path).get("zoo_hash") == h


def hashes(rec: dict[str, Any], base_digest: str, task: str) -> dict[str, str]:
    """Hashes of each stage for one task; later stages chain the earlier ones."""
    data = config.digest("data", rec["seed"], rec["data"], task)
    head = config.digest("head", data, base_digest, rec["heads"])
    ft = config.digest("ft", head, rec["finetune"], rec["replay"])
    return {"data": data, "head": head, "ft": ft}


def copy_committed(task: str, out: str, h: str, committed: str = COMMITTED_TASKS) -> bool:
    """Copy the committed fine-tune of ``task`` to ``out`` if it was built from hash ``h``; False when there is none."""
    src = os.path.join(committed, f"{task}.safetensors")
    if not _fresh(src, h):
        return False
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.copyfile(src, out + ".tmp")
    os.replace(out + ".tmp", out)
    return True


def cached_npz(path: str, h: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored at ``path`` if they were built from hash ``h``; else ``make()``, saved atomically."""
    if os.path.exists(path):
        with np.load(path) as z:
            if str(z["recipe_hash"]) == h:
                return {k: z[k] for k in z.files if k != "recipe_hash"}
    arrays = make()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, recipe_hash=np.array(h), **arrays)
    os.replace(tmp, path)
    return arrays


def load_data(task: str, cache: str, rec: dict[str, Any], h: str) -> datasets.Split:
    d = rec["data"]
    return cached_npz(os.path.join(cache, "data", f"{task}.npz"), h, lambda: datasets.build_task(task, d["n_train"], d["n_test"], rec["seed"]))


def _finetune_job(job: dict[str, Any]) -> str:
    """One task's fine-tune in its own process (single-threaded: two of these beat one 2-thread run)."""
    torch.set_num_threads(job["threads"])
    base = load_encoder(job["base"])
    weight, _, _ = load_head(job["head"])
    with np.load(job["data"]) as z:
        x, y = z["x_train"], z["y_train"]
    with np.load(job["replay"]) as z:
        xr = z["x"]
    model = finetune(base, weight, x, y, job["cfg"], seed=job["seed"], desc=f"finetune {job['task']}", progress=job["progress"], replay=xr)
    save_encoder(model, job["out"], job["arch"], {"zoo_hash": job["hash"], "task": job["task"]})
    return job["task"]


def _run_finetunes(jobs: list[dict[str, Any]], workers: int) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _finetune_job(job)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent has already started OpenMP threads
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for done in tqdm(as_completed([pool.submit(_finetune_job, j) for j in jobs]), total=len(jobs), desc="fine-tuning"):
            tqdm.write(f"fine-tuned {done.result()}")


def build(
    cache: str,
    quick: bool = False,
    tasks: tuple[str, ...] = datasets.TASKS,
    base_path: str = BASE_PATH,
    threads: int = 2,
    jobs: int | None = None,
    refinetune: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) everything under ``cache``; return per-task accuracies.

    ``threads``: CPU cores to use. Fine-tunes run as ``jobs`` single-threaded processes
    (default: one per core), which on this tiny ViT is ~1.6x faster than one process
    with 2 OpenMP threads; each process's result does not depend on the others."""
    rec = config.recipe(quick)
    jobs = max(1, threads if jobs is None else jobs)
    torch.set_num_threads(threads)
    t0 = time.time()
    os.makedirs(os.path.join(cache, "heads"), exist_ok=True)
    os.makedirs(os.path.join(cache, "tasks"), exist_ok=True)
    cached_base = os.path.join(cache, "base.safetensors")
    base_digest = config.file_digest(base_path)
    if not os.path.exists(cached_base) or config.file_digest(cached_base) != base_digest:
        shutil.copyfile(base_path, cached_base)
    base = load_encoder(cached_base)
    replay_path = os.path.join(cache, "replay.npz")
    arch_meta = {k: v for k, v in _meta(cached_base).items() if k != "recipe"}
    arch = {k: (float(v) if k == "mlp_ratio" else int(v)) for k, v in arch_meta.items() if k != "activation"}
    results: dict[str, Any] = {"quick": quick, "recipe": rec, "tasks": {}}
    pending: list[dict[str, Any]] = []
    datas: dict[str, datasets.Split] = {}
    for task in tqdm(tasks, desc="zoo data and heads"):
        h = hashes(rec, base_digest, task)
        data = datas[task] = load_data(task, cache, rec, h["data"])
        classes = [str(c) for c in data["classes"]]
        head_path = os.path.join(cache, "heads", f"head_{task}.safetensors")
        if not _fresh(head_path, h["head"]):
            idx = balanced_subset(data["y_train"], rec["heads"]["per_class"], rec["seed"])
            w = fit_prototypes(base, data["x_train"][idx], data["y_train"][idx], len(classes), rec["heads"]["logit_scale"])
            save_head(head_path, w, task, classes, {"zoo_hash": h["head"], "logit_scale": str(rec["heads"]["logit_scale"])})
        task_path = os.path.join(cache, "tasks", f"{task}.safetensors")
        if not _fresh(task_path, h["ft"]) and (refinetune or not copy_committed(task, task_path, h["ft"])):
            pending.append(
                {
                    "task": task,
                    "base": cached_base,
                    "head": head_path,
                    "data": os.path.join(cache, "data", f"{task}.npz"),
                    "cfg": rec["finetune"],
                    "replay": replay_path,
                    # the task's place in ALL_TASKS (the main eight's in TASKS), whatever --tasks lists
                    "seed": rec["seed"] * 100 + datasets.ALL_TASKS.index(task),
                    "out": task_path,
                    "arch": arch,
                    "hash": h["ft"],
                    "threads": 1 if jobs > 1 else threads,
                    "progress": jobs <= 1,
                }
            )
    if pending:
        r = rec["replay"]
        cached_npz(replay_path, config.digest("replay", base_digest, r), lambda: {"x": replay.render(replay.base_recipe(cached_base), r["n"], r["seed"])})
    _run_finetunes(pending, min(jobs, len(pending)))
    for task in tasks:
        data = datas[task]
        weight, bias, _ = load_head(os.path.join(cache, "heads", f"head_{task}.safetensors"))
        tuned = load_encoder(os.path.join(cache, "tasks", f"{task}.safetensors"))
        acc_base = accuracy(base, weight, data["x_test"], data["y_test"], bias)
        acc_ft = accuracy(tuned, weight, data["x_test"], data["y_test"], bias)
        results["tasks"][task] = {
            "pretrained": round(acc_base, 4),
            "finetuned": round(acc_ft, 4),
            "n_train": int(len(data["y_train"])),
            "n_test": int(len(data["y_test"])),
            "n_classes": len(data["classes"]),
        }
        tqdm.write(f"{task:10s} pretrained {100 * acc_base:5.1f}  finetuned {100 * acc_ft:5.1f}")
    accs = results["tasks"].values()
    results["mean"] = {k: round(float(np.mean([a[k] for a in accs])), 4) for k in ("pretrained", "finetuned")}
    results["seconds"] = round(time.time() - t0, 1)
    print(
        f"{'mean':10s} pretrained {100 * results['mean']['pretrained']:5.1f}  finetuned {100 * results['mean']['finetuned']:5.1f}   ({results['seconds']:.0f}s)"
    )
    with open(os.path.join(cache, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description="Build the embedded benchmark zoo.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build data, heads and fine-tuned task models")
    b.add_argument("--quick", action="store_true", help="tiny sizes for CI (a few minutes)")
    b.add_argument("--cache", default=None, help=f"cache dir (default {DEFAULT_CACHE}, or {QUICK_CACHE} with --quick)")
    b.add_argument("--tasks", default=",".join(datasets.TASKS), help="comma-separated tasks of datasets.ALL_TASKS (default: the main eight)")
    b.add_argument("--base", default=BASE_PATH, help="base checkpoint (default: the committed one)")
    b.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU cores to use (default 2)")
    b.add_argument("--jobs", type=int, default=None, help="parallel single-threaded fine-tunes (default: --threads)")
    b.add_argument("--refinetune", action="store_true", help="fine-tune the task models here instead of copying the committed ones")
    args = ap.parse_args(argv)
    requirements.ensure()
    tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in tasks if t not in datasets.ALL_TASKS]
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(datasets.ALL_TASKS)}")
    cache = args.cache or (QUICK_CACHE if args.quick else DEFAULT_CACHE)
    build(cache, args.quick, tasks, args.base, args.threads, args.jobs, args.refinetune)


__all__ = ["build", "main", "load_state"]
