"""The measured stages of ``python -m benchmarks.speed``, each in its own process so that its peak RSS is its own."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import REPO, make_checkpoints


def _gb(n: float) -> float:
    return n / 1e9


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(cmd: list[str]) -> tuple[float, int, str]:
    """Wall time, peak RSS and stdout of a child, reaped with wait4 to get its own rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    out_chunks, err_chunks = [], []

    def pump(stream, sink):
        for line in iter(stream.readline, b""):
            sink.append(line)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out_chunks)), threading.Thread(target=pump, args=(proc.stderr, err_chunks))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} failed:\n{b''.join(err_chunks).decode()[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024, b"".join(out_chunks).decode()


def stage_checkpoints(arch: str, experts: int, work: Path) -> tuple[Path, list[Path]]:
    """The random-init base and task checkpoints under ``work`` (made once), by a child process.

    In a child: a forked child's ru_maxrss starts from its parent's RSS (and survives exec), so
    the parent must stay small for the measured children's peaks to be their own.
    """
    made = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--stage", "checkpoints", "--arch", arch, "--experts", str(experts), "--model", str(work)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    paths = json.loads(made.stdout.strip().splitlines()[-1])
    return Path(paths["base"]), [Path(t) for t in paths["tasks"]]


def stage_merges(base: Path, tasks: list[Path], work: Path, threads: int, wemoe_flags: list[str]) -> dict:
    res = {}
    for method in ("task-arithmetic", "wemoe"):
        out = work / f"merged-{method}"
        cmd = [
            sys.executable,
            "-m",
            "wemoe.cli",
            "merge",
            "--base",
            str(base),
            "--tasks",
            *map(str, tasks),
            "--method",
            method,
            "--out",
            str(out),
            "--force",
            "--quiet",
            "--device",
            "cpu",
            *(wemoe_flags if method == "wemoe" else []),
        ]
        env_threads = ["env", f"OMP_NUM_THREADS={threads}"]
        wall, rss, _ = measure(env_threads + cmd)
        ref = dir_size(out) + tasks[0].stat().st_size
        res[method] = {
            "seconds": round(wall, 2),
            "peak_rss_gb": round(_gb(rss), 3),
            "output_gb": round(_gb(dir_size(out)), 3),
            "input_gb": round(_gb(tasks[0].stat().st_size), 3),
            "rss_ratio": round(rss / ref, 3),
        }
    return res


# ----------------------------------------------------------------- child stages
def _setup(model_dir: str, base: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    import wemoe
    from wemoe.checkpoints.checkpoint import open_checkpoint
    from wemoe.model.vit import build_vit

    moe = wemoe.load(model_dir)
    ck = open_checkpoint(base)
    plain = build_vit(ck.arch, ck.state_dict())
    return torch, moe, plain


def _time(fn, repeat: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def child_inference(model_dir: str, base: str, batch: int, naive_samples: int, threads: int) -> dict:
    torch, moe, plain = _setup(model_dir, base, threads)
    from wemoe.moe.reference import reference_forward

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, moe.arch.image_size, moe.arch.image_size, generator=g)
    with torch.no_grad():
        t_plain = _time(lambda: plain(x))
        t_moe = _time(lambda: moe(x))
        y = moe(x)

        def naive(xs, merge):
            return reference_forward(moe, xs, merge)

        xs = x[:naive_samples]
        scaled, rels = {}, []
        for merge in ("loop", "einsum"):
            t0 = time.perf_counter()
            y_naive = naive(xs, merge)
            scaled[merge] = (time.perf_counter() - t0) * batch / naive_samples
            rels.append(((y[:naive_samples] - y_naive).norm() / y_naive.norm()).item())
    return {
        "plain_s": t_plain,
        "wemoe_s": t_moe,
        "naive_s_scaled": min(scaled.values()),
        "naive_loop_s_scaled": scaled["loop"],
        "naive_einsum_s_scaled": scaled["einsum"],
        "naive_samples": naive_samples,
        "max_rel_diff": max(rels),
    }


def child_step(model_dir: str, base: str, per_task: int, threads: int) -> dict:
    torch, moe, plain = _setup(model_dir, base, threads)
    from wemoe.adaptation.objectives import entropy

    T = len(moe.task_names)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(per_task, 3, moe.arch.image_size, moe.arch.image_size, generator=g) for _ in range(T)]
    heads = [torch.randn(10, moe.arch.output_dim, generator=g) for _ in range(T)]
    params = moe.router_parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-4)

    def moe_step():
        opt.zero_grad()
        for x, h in zip(xs, heads):
            entropy(moe(x) @ h.T).backward()
        opt.step()

    plain.train(False)
    for p in plain.parameters():
        p.requires_grad_(True)
    allx = torch.cat(xs)
    allh = torch.cat(heads)

    def plain_step():
        plain.zero_grad()
        entropy(plain(allx) @ allh.T).backward()

    return {"plain_fwd_bwd_s": _time(plain_step, 1), "wemoe_step_s": _time(moe_step, 1), "images": per_task * T}


def run_child(args: argparse.Namespace) -> None:
    if args.stage == "checkpoints":
        base, tasks = make_checkpoints(args.arch, args.experts, Path(args.model))
        res = {"base": str(base), "tasks": [str(t) for t in tasks]}
    elif args.stage == "inference":
        res = child_inference(args.model, args.base, args.batch, args.naive_samples, args.threads)
    else:
        res = child_step(args.model, args.base, args.per_task, args.threads)
    print(json.dumps(res))
