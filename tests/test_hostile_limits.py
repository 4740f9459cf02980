"""Small hostile inputs that ask for unbounded memory, and numbers past what a run can hold.

Each memory case runs the real CLI in a child process whose address space is capped
at what its imports take plus 1.5 GiB (``RLIMIT_AS``): a YAML alias bomb, a batch size
of 10**14, a record claiming a depth of 10**9, an .npz claiming terabytes. Each must end
in one line from wemoe, within the cap, with nothing written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wemoe.io.safetensors_io import save_tensors

from cli_helpers import assert_one_line_error, run_cli
from factories import EMBED, IMAGE, zoo

ROOT = Path(__file__).resolve().parents[1]
HEADROOM = 3 << 29  # 1.5 GiB past the imports

CAPPED = """
import resource, sys
import torch, numpy, PIL.Image, yaml
import wemoe.cli, wemoe.merging.job, wemoe.outputs.loading, wemoe.commands.evaluate
vm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmSize:"):
        vm = int(line.split()[1]) * 1024
cap = vm + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
wemoe.cli.main(sys.argv[2:])
"""


def capped(*args, cwd: Path) -> tuple[int, str]:
    """``wemoe ARGS`` in a child whose address space is capped; returns (exit code, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    proc = subprocess.run([sys.executable, "-c", CAPPED, str(HEADROOM), *[str(a) for a in args]], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


QUIET = "-q"  # progress bars are not errors


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the address-space size from /proc")


@pytest.fixture(scope="module")
def z(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_limits")
    base, tasks, _, _ = zoo(tmp, tasks=2)
    rng = np.random.default_rng(0)
    head = tmp / "head.safetensors"
    save_tensors(head, {"weight": torch.randn(4, EMBED), "bias": torch.zeros(4)})
    data = tmp / "data.npz"
    np.savez(data, x=rng.integers(0, 256, (8, IMAGE, IMAGE, 3), dtype=np.uint8), y=np.arange(8) % 4)
    tasks = [f"a={tasks[0]}", f"b={tasks[1]}"]
    adaptive = ["--method", "wemoe", "--heads", f"a={head}", f"b={head}", "--data", f"a={data}", f"b={data}"]
    return SimpleNamespace(tmp=tmp, base=base, tasks=tasks, head=head, data=data, adaptive=adaptive)


def nothing_written(tmp: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp.iterdir() if ".wemoe-tmp-" in p.name]


# --------------------------------------------------------------------------- YAML


BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, "a", "b", "c", "d", "e", "f", "g", "h"], "abcdefghi")
)


@needs_proc
@pytest.mark.parametrize("key", ["lambda", "tasks", "seed"])
def test_yaml_alias_bomb_is_refused_within_the_cap(z, key):
    cfg = z.tmp / f"bomb_{key}.yaml"
    cfg.write_text(BOMB + f"{key}: *i\n")
    assert cfg.stat().st_size < 1000  # 9**9 values once expanded
    out = z.tmp / "bomb_out"
    rc, err = capped("merge", "--config", cfg, "--base", z.base, "--tasks", *z.tasks, "--out", out, QUIET, cwd=z.tmp)
    assert_one_line_error(rc, err, cfg.name, "alias")
    assert len(err) < 2500
    nothing_written(z.tmp, out)


def test_yaml_numbers_and_shapes_that_overflow(z, capsys):
    cases = {
        "steps_inf": ("method: wemoe\nsteps: .inf\n", "steps"),
        "steps_nan": ("method: wemoe\nsteps: .nan\n", "steps"),
        "lambda_huge": ("lambda: 1e400\n", "lambda"),
        "steps_huge_int": ("method: wemoe\nbatch_size: " + "9" * 5000 + "\n", "steps_huge_int.yaml"),
        "seed_inf": ("seed: .inf\n", "seed"),
        "seed_huge": ("seed: 100000000000000000000000\n", "seed"),
        "seed_negative": ("seed: -1\n", "seed"),
        "deep": ("lambda: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
        "bad_date": ("out: 2001-99-99\n", "invalid YAML"),
        "int_key": ("1: 2\n", "unknown config key"),
        "list_key": ("? [a, b]\n: 2\n", "YAML"),
        "task_field_int": ("tasks:\n  a: {checkpoint: x, 3: y}\n", "unknown field"),
    }
    for name, (text, fragment) in cases.items():
        cfg = z.tmp / f"{name}.yaml"
        cfg.write_text(f"base: {z.base}\n" + text)
        out = z.tmp / f"never_{name}"
        rc, _, err = run_cli(capsys, "merge", "--config", cfg, "--tasks", *z.tasks, "--out", out)
        assert_one_line_error(rc, err, fragment)
        assert "internal error" not in err and len(err) < 2500, name
        nothing_written(z.tmp, out)


def test_huge_yaml_file_is_not_read_whole(z, capsys):
    cfg = z.tmp / "huge.yaml"
    with open(cfg, "wb") as f:
        f.write(b"base: x\n# ")
        f.truncate(64 << 20)
    rc, _, err = run_cli(capsys, "merge", "--config", cfg, "--tasks", *z.tasks, "--out", z.tmp / "never_huge")
    assert_one_line_error(rc, err, "huge.yaml", "larger than")


# --------------------------------------------------------------------------- numbers the run cannot hold


@needs_proc
def test_batch_size_past_memory_is_refused_before_any_allocation(z):
    out = z.tmp / "batch_out"
    for flag in (["--batch-size", str(10**14)], ["--batch-size", str(10**9)]):
        rc, err = capped("merge", "--base", z.base, "--tasks", *z.tasks, *z.adaptive, "--steps", "1", *flag, "--out", out, QUIET, cwd=z.tmp)
        assert rc == 2, err
        assert_one_line_error(rc, err, "--batch-size", "GiB")
        nothing_written(z.tmp, out)
    rc, err = capped("merge", "--base", z.base, "--tasks", *z.tasks, *z.adaptive, "--batch-size", str(10**14), "--dry-run", QUIET, cwd=z.tmp)
    assert_one_line_error(rc, err, "--batch-size")


@needs_proc
def test_eval_and_routes_with_huge_batch_sizes_stay_bounded(z):
    rc, err = capped("eval", z.base, "--task", f"a={z.head}:{z.data}", "--batch-size", str(10**14), "-q", cwd=z.tmp)
    assert rc == 0, err  # a batch is never larger than the data


def test_seed_outside_the_generators_range(z, capsys):
    for seed in (str(2**64), str(2**32), "-1", "100000000000000000000000"):
        out = z.tmp / "never_seed"
        rc, _, err = run_cli(capsys, "merge", "--base", z.base, "--tasks", *z.tasks, "--seed", seed, "--out", out, "--dry-run")
        assert rc == 2, err
        assert_one_line_error(rc, err, "seed", "4294967295")
    rc, _, err = run_cli(capsys, "merge", "--base", z.base, "--tasks", *z.tasks, "--seed", str(2**32 - 1), "--dry-run", "-q")
    assert rc == 0, err


# --------------------------------------------------------------------------- files that claim more than they hold


def npz_claiming(path: Path, shape: tuple[int, ...], compressed: bool) -> Path:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as zf:
        zf.writestr("x.npy", header.getvalue() + b"\0" * 64)
        zf.writestr("y.npy", _npy(np.arange(8) % 4))
    return path


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@needs_proc
@pytest.mark.parametrize(
    "name,shape,compressed,fragment",
    [
        ("claims_tib.npz", (10**7, 1000, 1000, 3), False, "GiB"),
        ("claims_more_than_held.npz", (8, 32, 32, 3), False, "holds only"),
        ("compressed_claim.npz", (200_000, 1000, 1000, 3), True, "GiB"),
    ],
)
def test_npz_that_claims_more_than_it_holds(z, name, shape, compressed, fragment):
    path = npz_claiming(z.tmp / name, shape, compressed)
    out = z.tmp / f"npz_out_{name}"
    rc, err = capped("merge", "--base", z.base, "--tasks", *z.tasks, *z.adaptive[:-3], "--data", f"a={path}", f"b={z.data}", "--out", out, QUIET, cwd=z.tmp)
    assert_one_line_error(rc, err, name, fragment)
    nothing_written(z.tmp, out)
    rc, err = capped("eval", z.base, "--task", f"a={z.head}:{path}", QUIET, cwd=z.tmp)
    assert_one_line_error(rc, err, name, fragment)


@needs_proc
def test_output_record_claiming_a_huge_model_within_the_cap(z, capsys):
    """A record claiming depth 10**9 (or width 10**9) is refused before a module is built, under the cap."""
    out = z.tmp / "moe_for_limits"
    rc, _, err = run_cli(capsys, "merge", "--base", z.base, "--tasks", *z.tasks, *z.adaptive, "--steps", "1", "--batch-size", "2", "--out", out, "-q")
    assert rc == 0, err
    for key, value in (("depth", 10**9), ("width", 10**9), ("mlp_width", 10**6), ("depth", 512)):
        model = z.tmp / f"claims_{key}_{value}"
        shutil.copytree(out, model)
        cfg = json.loads((model / "config.json").read_text())
        cfg["architecture"][key] = value
        (model / "config.json").write_text(json.dumps(cfg))
        rc, err = capped("eval", model, "--task", f"a=:{z.data}", QUIET, cwd=z.tmp)
        assert_one_line_error(rc, err, model.name, key if key != "depth" or value > 1024 else "depth")
