"""Adaptation under torchrun: 2 CPU ranks (gloo) on tiny models give what one process
gives, rank 0 alone prints and writes, and a bad input, a killed rank or a hung rank
ends every rank with a one-line error within a bounded time."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from wemoe.adaptation import distributed
from wemoe.errors import ReportedElsewhere, UsageError, WemoeError
from wemoe.io.output import TMP_MARK
from wemoe.io.safetensors_io import load_tensors

from cli_helpers import run_cli
from factories import zoo
from test_adamerging import heads_and_data

ROOT = Path(__file__).resolve().parents[1]
T = 3  # with 2 ranks and 16 images per task: rank 0 takes t0 and half of t1's batch, rank 1 the rest
# How far 2 ranks may land from 1 process (same seed and data): the largest relative Frobenius
# difference over the trained tensors. Measured (12 steps, this suite's models) on an AVX-512 Xeon:
# AdaMerging's merged weights 2.7e-8, a slice of a batch weighed 1 instead of n/B 5.4e-3. Routers
# 7.3e-5, all in one hidden unit of one router (a ReLU pre-activation within rounding of zero falls
# on the other side in one run; Adam carries the step on), weighed wrongly 1.27 (every tensor >= 5e-2).
ROUTER_RTOL = 1e-2
MERGED_RTOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    base, tasks, _, _ = zoo(tmp, tasks=T)
    heads, data = heads_and_data(tmp, T, n=48)
    return tmp, {"base": base, "tasks": tasks, "heads": heads, "data": data}


def inputs(setup, **data: str) -> list[str]:
    """Base, tasks, heads and data (``data`` replaces a task's), on the CPU, seed 3."""
    _, z = setup
    given = {**z["data"], **data}
    return [
        *("--base", str(z["base"]), "--tasks", *[f"t{i}={p}" for i, p in enumerate(z["tasks"])]),
        *("--heads", *[f"{k}={v}" for k, v in z["heads"].items()], "--data", *[f"{k}={v}" for k, v in given.items()]),
        *("--device", "cpu", "--seed", "3"),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun(tmp: Path, name: str, args: list[str], **env: str) -> tuple[subprocess.Popen, Path]:
    """``python -m torch.distributed.run --nproc-per-node 2 -m wemoe ...`` on 127.0.0.1; each rank's output goes to its own log."""
    logs = tmp / f"logs-{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), "--log-dir", str(logs), "--redirects", "3", "-m", "wemoe", *args]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environ = dict(os.environ, PYTHONPATH=path, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", **env)
    return subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), logs


def rank_log(logs: Path, rank: int, stream: str = "stderr") -> str:
    found = list(logs.glob(f"*/attempt_0/{rank}/{stream}.log"))
    return found[0].read_bytes().decode() if found else ""  # as written: progress bars keep their \r


def shown_lines(text: str) -> list[str]:
    """What a terminal shows: progress bars redraw with \\r."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"torchrun still running after {timeout} s") from None
    return proc.returncode, time.monotonic() - started


def single_process(capsys, tmp: Path, name: str, args: list[str]) -> Path:
    """The same merge in this process, on one thread like each rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_cli(capsys, "merge", *args, "--out", tmp / name, "-q")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return tmp / name


def assert_close_json(a, b, where: str = "") -> None:
    """Equal, except floats within 1e-5 relative or 2e-6 absolute (losses summed in another order; values rounded to 6 decimals)."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=2e-6), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_json(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _parsed(metadata: dict[str, str]) -> dict:
    """safetensors header metadata: JSON-encoded values, decoded for a tolerant comparison."""
    out = {}
    for k, v in metadata.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def compare_outputs(one: Path, two: Path, trained: str, rtol: float) -> None:
    """Same files; tensors equal but for the trained ones (within ``rtol``, relative); JSON equal but for float digits; heads byte-identical."""
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    a, meta_a = load_tensors(one / "model.safetensors")
    b, meta_b = load_tensors(two / "model.safetensors")
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if trained in key:
            ref = a[key].double()
            worst = max(worst, ((ref - b[key].double()).norm() / ref.norm().clamp_min(1e-12)).item())
        else:
            assert torch.equal(a[key], b[key]), key
    assert worst <= rtol, f"trained tensors differ by {worst:.2e} (relative)"
    assert_close_json(_parsed(meta_a), _parsed(meta_b), "metadata")
    assert_close_json(json.loads((one / "config.json").read_text()), json.loads((two / "config.json").read_text()), "config")
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert ra.keys() == rb.keys()
    assert_close_json(ra.get("loss_curve"), rb.get("loss_curve"), "loss_curve")
    if (one / "heads.safetensors").exists():
        assert (one / "heads.safetensors").read_bytes() == (two / "heads.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("method", "trained", "extra", "rtol"),
    [
        ("wemoe", ".routers.", ["--objective", "entropy+task", "--lr", "1e-3"], ROUTER_RTOL),  # a routing objective, pieces of a task's batch
        ("adamerging", "", ["--granularity", "layer", "--lr", "2e-2"], MERGED_RTOL),
    ],
)
def test_two_ranks_equal_one_process(setup, capsys, method, trained, extra, rtol):
    tmp, _ = setup
    args = [*inputs(setup), "--method", method, "--steps", "12", *extra]
    proc, logs = start_torchrun(tmp, method, ["merge", *args, "--out", str(tmp / f"{method}-2")])
    code, _ = finish(proc, timeout=120)
    assert code == 0, rank_log(logs, 0) + rank_log(logs, 1)
    assert rank_log(logs, 1) == "" and rank_log(logs, 1, "stdout") == "", "rank 1 printed"
    assert "adapting" in rank_log(logs, 0) and shown_lines(rank_log(logs, 0))[-1].startswith(f"wrote {tmp / f'{method}-2'}")
    one = single_process(capsys, tmp, f"{method}-1", args)
    if method == "adamerging":  # a plain checkpoint: every tensor carries trained coefficients
        moved = json.loads((one / "config.json").read_text())["adamerging"]["coefficients"]
        assert max(abs(c - 0.3) for cs in moved.values() for c in cs) > 1e-2, "coefficients did not train"
    else:
        cfg = json.loads((one / "config.json").read_text())["wemoe"]["adaptation"]
        assert abs(cfg["final_loss"] - cfg["initial_loss"]) > 1e-3, "routers did not train"
    compare_outputs(one, tmp / f"{method}-2", trained, rtol)


def test_bad_input_stops_every_rank_with_one_line(setup):
    tmp, _ = setup
    missing = tmp / "missing.npz"
    args = [*inputs(setup, t0=str(missing)), "--method", "wemoe", "--steps", "2", "--out", str(tmp / "bad")]
    proc, logs = start_torchrun(tmp, "bad", ["merge", *args])
    code, _ = finish(proc, timeout=90)  # bounded: no rank waits for the others
    assert code != 0
    lines = shown_lines(rank_log(logs, 0))
    assert lines == [f"wemoe: error: {missing}: no such file or directory"], lines
    assert rank_log(logs, 1) == "", "rank 1 repeated the error"
    assert "Traceback" not in rank_log(logs, 0) and not (tmp / "bad").exists()


def _ranks(agent: int, timeout: float = 60.0) -> dict[int, int]:
    """pid of each torchrun worker, by LOCAL_RANK (workers are the agent's children)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for task in Path(f"/proc/{agent}/task").iterdir():
            try:
                children = (task / "children").read_text().split()
            except OSError:  # the agent's thread ended meanwhile
                continue
            for pid in children:
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:  # a short-lived child (not a worker) exited between the listing and the read
                    continue
                rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"LOCAL_RANK=")), None)
                if rank is not None:
                    found[rank] = int(pid)
        if len(found) == 2:
            return found
        time.sleep(0.1)
    raise AssertionError("torchrun did not start 2 workers")


def _adapting(proc: subprocess.Popen, logs: Path, timeout: float = 90.0) -> None:
    """Wait until rank 0 has done a few adaptation steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "3/100000" in rank_log(logs, 0):
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended before adapting: {rank_log(logs, 0)}{rank_log(logs, 1)}")
        time.sleep(0.1)
    raise AssertionError("adaptation did not start")


def _errors(text: str) -> list[str]:
    assert "Traceback" not in text
    return [line for line in shown_lines(text) if not line.startswith(("adapting", "validating", "upscaling"))]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc")
def test_killed_rank_ends_the_run_with_one_line(setup):
    tmp, _ = setup
    args = ["merge", *inputs(setup), "--method", "wemoe", "--steps", "100000", "--out", str(tmp / "killed")]
    proc, logs = start_torchrun(tmp, "killed", args)
    ranks = _ranks(proc.pid)
    _adapting(proc, logs)
    os.kill(ranks[1], signal.SIGKILL)
    code, seconds = finish(proc, timeout=60)
    assert code != 0 and seconds < 30, seconds
    errors = _errors(rank_log(logs, 0))
    assert len(errors) == 1, errors
    assert errors[0].startswith("wemoe: error: rank 0 of 2 ")
    assert "lost contact with another rank while adapting (its connection closed)" in errors[0] or "stopped by SIGTERM" in errors[0], errors[0]
    assert not (tmp / "killed").exists() and not [p for p in tmp.iterdir() if p.name.startswith(f".killed{TMP_MARK}")]


def test_hung_rank_ends_the_run_after_the_timeout(setup, monkeypatch):
    """Rank 1 is this test process: it joins the group, then never answers; rank 0 (a real `wemoe merge`) gives up after the timeout."""
    tmp, _ = setup
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), GLOO_SOCKET_IFNAME="lo")
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WEMOE_DIST_TIMEOUT="3")
    args = [sys.executable, "-m", "wemoe", "merge", *inputs(setup), "--method", "wemoe", "--steps", "2", "--out", str(tmp / "hung")]
    rank0 = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2, timeout=timedelta(seconds=60))
        joined = time.monotonic()
        _, err = rank0.communicate(timeout=60)
        waited = time.monotonic() - joined
    finally:
        rank0.kill()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert rank0.returncode == 1 and 3 <= waited < 20, waited
    assert shown_lines(err) == ["wemoe: error: " + _lost("checking the inputs", "no answer within 3 s")]
    assert not (tmp / "hung").exists()


def _lost(doing: str, why: str) -> str:
    return f"rank 0 of 2 lost contact with another rank while {doing} ({why}): that rank exited, crashed or hung; its own error or torchrun's report says why"


# ------------------------------------------------------------------ without processes
def test_shares_cover_every_image_once_in_order():
    for sizes in ([16, 16, 16], [16] * 8, [16], [5, 7], [16, 16]):
        for ranks in (1, 2, 3, 4, 8):
            pieces = [p for r in range(ranks) for p in distributed.share(sizes, r, ranks)]
            flat = [(t, i) for t, start, stop in pieces for i in range(start, stop)]
            assert flat == [(t, i) for t, n in enumerate(sizes) for i in range(n)], (sizes, ranks)
            loads = [sum(stop - start for _, start, stop in distributed.share(sizes, r, ranks)) for r in range(ranks)]
            assert max(loads) - min(loads) <= 1, (sizes, ranks, loads)
    assert distributed.share([16] * 8, 1, 4) == [(2, 0, 16), (3, 0, 16)]  # as many tasks as ranks, or a multiple: whole tasks
    assert distributed.share([16, 16], 3, 4) == [(1, 8, 16)]  # fewer tasks than ranks: a slice of a task's batch


def test_single_process_is_not_distributed(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched() is None and distributed.current() == distributed.World()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: the single-process path
    assert distributed.launched() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.launched() == distributed.World(2, 4, 0)
    monkeypatch.setenv("WEMOE_DIST_TIMEOUT", "soon")
    with pytest.raises(WemoeError, match="WEMOE_DIST_TIMEOUT must be a positive number of seconds"):
        distributed.timeout_seconds()


def test_agreement_reports_the_first_failure_once(monkeypatch):
    """Rank 0 raises its own error or the first other rank's; the other ranks stop without printing."""

    def gathered(reports):
        monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), reports))

    gathered([None, ("usage", "--lr must be > 0")])
    with pytest.raises(UsageError, match=r"^rank 1 of 2: --lr must be > 0$"):
        distributed.World(0, 2).agree(lambda: "ok")
    with pytest.raises(ReportedElsewhere) as stopped:
        distributed.World(1, 2).agree(lambda: (_ for _ in ()).throw(UsageError("--lr must be > 0")))
    assert stopped.value.exit_code == 2
    gathered([("error", "base.pt: truncated"), None])
    with pytest.raises(WemoeError, match="^base.pt: truncated$"):
        distributed.World(0, 2).agree(lambda: (_ for _ in ()).throw(WemoeError("truncated", path="base.pt")))
    gathered([None, None])
    assert distributed.World(1, 2).agree(lambda: 42) == 42


def test_failed_rank_group_exits_without_teardown(monkeypatch, capsys):
    """After a failed multi-rank session the CLI leaves by os._exit with its exit code (a gloo group whose
    peer died can abort in its exit-time destructors, printing a second line); a plain run exits normally."""
    from wemoe import cli

    hard_exits: list[int] = []

    def fake_exit(code: int) -> None:
        hard_exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as plain:
        cli.main(["merge", "--no-such-option"])
    assert plain.value.code == 2 and hard_exits == []
    monkeypatch.setattr(distributed, "_SESSION_FAILED", True)
    with pytest.raises(SystemExit) as failed:
        cli.main(["merge", "--no-such-option"])
    assert failed.value.code == 2 and hard_exits == [2]
    assert capsys.readouterr().err.count("wemoe: error:") == 2
