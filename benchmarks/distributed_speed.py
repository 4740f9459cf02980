"""Router adaptation step time on 1 and 2 processes (torchrun, CPU) and, where there is a GPU, on 1 GPU.

    python -m benchmarks.distributed_speed                      # ViT-B/32, 8 experts, 16 images/task/step, 4 steps
    python -m benchmarks.distributed_speed --arch tiny          # a small model: checks that the benchmark runs

Each configuration is the real ``wemoe merge --method wemoe`` (through ``torchrun`` for
more than one process) on random-init open_clip checkpoints (``benchmarks.speed``),
random heads and random images. Each process runs wemoe's CLI with a global
optimiser hook (torch's ``register_optimizer_step_post_hook``) that timestamps every
step; the step time is the median interval between rank 0's steps, so the first
step's warm-up is left out (``report.json``'s adaptation time, which includes it, is
recorded too). The routers of the 2-process run are compared with the 1-process run's. Threads: one
process gets ``--threads``; each of N processes gets ``--threads / N`` (torchrun's
default is 1), so the configurations share the same cores.
Writes benchmarks/results/distributed_speed*.md and .json; the merged outputs are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, SPEED_CACHE, machine_description, make_checkpoints

SMALL = {
    "tiny": dict(width=128, depth=2, heads=2, patch_size=16, image_size=64, mlp_width=512, embed_dim=64, activation="quick_gelu"),
}
DEFAULT = ("ViT-B-32-quickgelu", 8)


def make_heads_and_data(arch: dict, experts: int, images: int, directory: Path) -> tuple[list[Path], list[Path]]:
    """A random 10-class head and ``images`` random images per task, written once."""
    import numpy as np
    import torch

    from wemoe.io.safetensors_io import save_tensors

    heads, data = [], []
    for i in range(experts):
        head, npz = directory / f"head{i:02d}.safetensors", directory / f"data{i:02d}.npz"
        if not head.exists():
            save_tensors(head, {"weight": torch.randn(10, arch["embed_dim"], generator=torch.Generator().manual_seed(i))}, {"normalize": "true"})
        if not npz.exists():
            rng = np.random.default_rng(i)
            np.savez(npz, x=rng.integers(0, 256, (images, arch["image_size"], arch["image_size"], 3), dtype=np.uint8))
        heads.append(head)
        data.append(npz)
    return heads, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_cli(stamps_path: str, wemoe_args: list[str]) -> None:
    """Inside each process: wemoe's CLI, every optimiser step timestamped; rank 0 writes the stamps."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda _opt, _args, _kwargs: stamps.append(time.perf_counter()))
    from wemoe.cli import main

    code: int | str | None = 0
    try:
        main(wemoe_args)
    except SystemExit as exc:
        code = exc.code
    if os.environ.get("RANK", "0") == "0":
        Path(stamps_path).write_text(json.dumps(stamps))
    sys.exit(code)


def median_interval(stamps: list[float]) -> float:
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    if not gaps:
        raise RuntimeError("fewer than 2 adaptation steps were timed: use --steps 2 or more")
    mid = len(gaps) // 2
    return gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2


def merge(inputs: list[str], out: Path, processes: int, device: str, threads: int, steps: int, per_task: int) -> dict:
    """One ``wemoe merge --method wemoe`` run: its adaptation step time (rank 0's median interval) and wall time."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes)]
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    stamps = out.with_name(out.name + "-steps.json")
    cmd = [*launcher, "-m", "benchmarks.distributed_speed", "--stage", "timed-cli", "--stamps", str(stamps), "--"]
    cmd += ["merge", *inputs, "--method", "wemoe", "--steps", str(steps), "--batch-size", str(per_task)]
    cmd += ["--device", device, "--out", str(out), "--force", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {
        "processes": processes,
        "device": device,
        "threads_per_process": threads,
        "adapt_s": report["seconds"]["adapt"],
        "step_s": median_interval(json.loads(stamps.read_text())),
        "build_s": report["seconds"]["build"],
        "wall_s": round(time.perf_counter() - started, 2),
    }


def router_difference(one: Path, two: Path) -> float:
    """Largest absolute difference between the routers of two outputs."""
    from wemoe.io.safetensors_io import load_tensors

    a, _ = load_tensors(one / "model.safetensors")
    b, _ = load_tensors(two / "model.safetensors")
    return max((a[k] - b[k]).abs().max().item() for k in a if ".routers." in k)


def report_md(r: dict) -> str:
    base = r["runs"][0]["step_s"]
    lines = [
        f"# Adaptation step time on several processes: {r['arch']}, {r['experts']} experts, {r['per_task']} images/task/step",
        "",
        f"Generated by `{r['command']}`; do not edit by hand. Machine: {r['machine']}; torch {r['torch']}.",
        "",
        "| configuration | processes | device | threads per process | adaptation step (s) | vs 1 process | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        lines.append(
            f"| {run['label']} | {run['processes']} | {run['device']} | {run['threads_per_process']} | {run['step_s']:.3f} "
            f"| {base / run['step_s']:.2f}x | {run['wall_s']:.1f} |"
        )
    lines += [
        "",
        f"- Step time: median interval between rank 0's optimiser steps over {r['steps']} steps (the first step's warm-up left out); "
        "wall time includes starting the processes, validating, building the model, adapting and writing it.",
        f"- Routers of the 2-process run against the 1-process run: largest absolute difference {r['router_max_abs_diff']:.1e} "
        "(float32 sums taken in another order).",
        f"- GPU: {r['gpu']}.",
        "- Threads wait for each other by spinning: on cores that other jobs also use, a 2-thread process can be several times slower "
        "than a 1-thread one (measured while writing this script: 2.5 s against 0.12 s per step on a tiny model), so measure on idle cores.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.distributed_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=DEFAULT[0], help=f"an architecture name wemoe knows, or one of: {', '.join(SMALL)}")
    ap.add_argument("--experts", type=int, default=DEFAULT[1])
    ap.add_argument("--per-task", type=int, default=16, help="images per task per step")
    ap.add_argument("--steps", type=int, default=4, help="adaptation steps per run (2 or more: the first, warm-up, is not timed)")
    ap.add_argument("--threads", type=int, default=2, help="cores shared by every configuration")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--stage", choices=["timed-cli"], help=argparse.SUPPRESS)
    ap.add_argument("--stamps", help=argparse.SUPPRESS)
    ap.add_argument("wemoe_args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        timed_cli(args.stamps, args.wemoe_args)
        return
    import torch

    from wemoe.core.arch import KNOWN_ARCHS

    spec = SMALL.get(args.arch) or KNOWN_ARCHS[args.arch]
    work = SPEED_CACHE / f"{args.arch}-{args.experts}"  # the checkpoints benchmarks.speed made, when it has run
    print(f"checkpoints, heads and data: {work}", flush=True)
    base, tasks = make_checkpoints(args.arch, args.experts, work, SMALL.get(args.arch))
    heads, data = make_heads_and_data(spec, args.experts, max(4 * args.per_task, 32), work)
    inputs = ["--base", str(base), "--tasks", *[f"t{i:02d}={p}" for i, p in enumerate(tasks)]]
    inputs += ["--heads", *[f"t{i:02d}={p}" for i, p in enumerate(heads)], "--data", *[f"t{i:02d}={p}" for i, p in enumerate(data)]]
    plan = [("1 process, CPU", 1, "cpu", args.threads), ("2 processes (torchrun), CPU", 2, "cpu", max(args.threads // 2, 1))]
    if args.threads > 1:  # what the processes gain, apart from what the threads would have
        plan.insert(1, ("1 process, CPU, 1 thread", 1, "cpu", 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 1:
        plan.append(("1 GPU", 1, "cuda", args.threads))
    if gpus >= 2:
        plan.append(("2 GPUs (torchrun)", 2, "cuda", max(args.threads // 2, 1)))
    runs = []
    for label, processes, device, threads in plan:
        print(f"{label}: {args.steps} steps", flush=True)
        out = work / f"out-{processes}-{device}-{threads}"
        runs.append({"label": label, **merge(inputs, out, processes, device, threads, args.steps, args.per_task)})
    result = {
        "arch": args.arch,
        "experts": args.experts,
        "per_task": args.per_task,
        "steps": args.steps,
        "threads": args.threads,
        "machine": machine_description(),
        "torch": torch.__version__,
        "command": "python -m benchmarks.distributed_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": runs,
        "router_max_abs_diff": router_difference(work / f"out-1-cpu-{args.threads}", work / f"out-2-cpu-{max(args.threads // 2, 1)}"),
        "gpu": f"measured on {torch.cuda.get_device_name(0)}" if gpus else "not measured (no CUDA device on this machine)",
    }
    for _, processes, device, threads in plan:  # a WEMoE output is ~2 GB at ViT-B/32: keep only the numbers
        shutil.rmtree(work / f"out-{processes}-{device}-{threads}", ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "distributed_speed" if (args.arch, args.experts) == DEFAULT else f"distributed_speed_{args.arch}_{args.experts}"
    md = report_md(result)
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
