"""Output directories appear whole or not at all: a failure, SIGKILL or Ctrl-C in
the middle of writing leaves nothing under the final name, a later run cleans
the dead run's temporary directory, ``--force`` swaps atomically, and the same
inputs and seed give byte-identical files."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wemoe.io.output import TMP_MARK
from wemoe.io.safetensors_io import SafetensorsWriter

from cli_helpers import assert_one_line_error, run_cli
from factories import zoo

ROOT = Path(__file__).resolve().parents[1]

# A real `wemoe merge` process whose writer pauses after each tensor, so a signal
# lands while the output is half written whatever the machine's speed.
SLOW_CLI = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignores SIGINT
from wemoe.io import safetensors_io
_write = safetensors_io.SafetensorsWriter.write
def write(self, key, tensor):
    _write(self, key, tensor)
    self._fh.flush()
    time.sleep(0.05)
safetensors_io.SafetensorsWriter.write = write
from wemoe.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def z(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atomic")
    base, tasks, _, _ = zoo(tmp, tasks=2)
    return tmp, base, [str(t) for t in tasks]


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}{TMP_MARK}"))


def merge_args(z, out: Path, *extra) -> list[str]:
    _, base, tasks = z
    return ["merge", "--base", str(base), "--tasks", *tasks, "--out", str(out), "-q", *extra]


def failing_writer(monkeypatch, after: int, exc: BaseException, check=None):
    real = SafetensorsWriter.write
    calls = {"n": 0}

    def write(self, key, tensor):
        if calls["n"] == after:
            if check is not None:
                check(self)
            raise exc
        calls["n"] += 1
        real(self, key, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", write)
    return calls


@pytest.mark.parametrize("method", ["task-arithmetic", "wemoe"])
def test_failure_while_writing_leaves_nothing(z, capsys, monkeypatch, method):
    tmp, _, _ = z
    out = tmp / f"crash_{method}"
    calls = failing_writer(monkeypatch, 1, RuntimeError("simulated crash after the first tensor"))
    code, _, err = run_cli(capsys, *merge_args(z, out, "--method", method))
    assert calls["n"] == 1  # the first tensor really was written into the temporary directory
    assert_one_line_error(code, err, "RuntimeError", "simulated crash")
    assert not out.exists() and leftovers(tmp, out.name) == []


def test_disk_full_is_one_line_naming_the_output(z, capsys, monkeypatch):
    tmp, _, _ = z
    out = tmp / "full"
    failing_writer(monkeypatch, 3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    code, _, err = run_cli(capsys, *merge_args(z, out))
    assert_one_line_error(code, err, str(out), os.strerror(errno.ENOSPC))
    assert not out.exists() and leftovers(tmp, out.name) == []


def _start_slow(z, out: Path, *extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *merge_args(z, out, *extra)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_writing(proc: subprocess.Popen, parent: Path, name: str, timeout: float = 60.0) -> Path:
    """Poll until the run's temporary directory holds a partly written model file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in leftovers(parent, name):
            files = list((parent / entry).glob("*.safetensors"))
            if files and any(f.stat().st_size > 0 for f in files):
                return parent / entry
        if proc.poll() is not None:
            raise AssertionError(f"merge ended before it was interrupted: {proc.communicate()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the merge never started writing")


def test_sigkill_while_writing_then_next_run_cleans_up(z, capsys):
    tmp, _, _ = z
    out = tmp / "killed"
    proc = _start_slow(z, out, "--shard-size", "20KB")
    stale = _wait_for_writing(proc, tmp, out.name)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert stale.is_dir()  # SIGKILL gives no chance to clean up: the dead run's directory stays...
    code, _, err = run_cli(capsys, *merge_args(z, out, "--shard-size", "20KB"))
    assert code == 0, err
    assert not stale.exists()  # ...until the next run to the same destination removes it
    assert leftovers(tmp, out.name) == []
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()


def test_live_runs_temporary_directory_is_not_cleaned(z, capsys):
    tmp, _, _ = z
    out = tmp / "busy"
    alive = tmp / f".{out.name}{TMP_MARK}{os.getpid()}-inuse"  # this process is alive: not stale
    alive.mkdir()
    code, _, err = run_cli(capsys, *merge_args(z, out))
    assert code == 0, err
    assert alive.is_dir() and out.is_dir()
    alive.rmdir()


def test_ctrl_c_while_writing(z):
    tmp, _, _ = z
    out = tmp / "interrupted"
    proc = _start_slow(z, out)
    _wait_for_writing(proc, tmp, out.name)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert_one_line_error(proc.returncode, err, "interrupted")
    assert not out.exists() and leftovers(tmp, out.name) == []


def test_force_replaces_atomically(z, capsys, monkeypatch):
    tmp, _, _ = z
    out = tmp / "forced"
    code, _, err = run_cli(capsys, *merge_args(z, out, "--lambda", "0.3"))
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def old_output_untouched(writer):
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # a forced run that fails halfway leaves the previous output exactly as it was
    failing_writer(monkeypatch, 5, RuntimeError("simulated crash"), check=old_output_untouched)
    code, _, err = run_cli(capsys, *merge_args(z, out, "--lambda", "0.7", "--force"))
    assert_one_line_error(code, err, "simulated crash")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp, out.name) == []
    monkeypatch.undo()
    # a forced run that succeeds swaps in the new output whole
    code, _, err = run_cli(capsys, *merge_args(z, out, "--lambda", "0.7", "--force"))
    assert code == 0, err
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before)
    assert after["model.safetensors"] != before["model.safetensors"] and b"0.7" in after["config.json"]
    assert leftovers(tmp, out.name) == []


def test_same_seed_same_bytes(z, capsys):
    tmp, _, _ = z
    runs = []
    for i in range(2):
        out = tmp / f"repeat{i}"
        code, _, err = run_cli(capsys, *merge_args(z, out, "--method", "ties", "--seed", "5"))
        assert code == 0, err
        runs.append(out)
    for name in ("model.safetensors", "config.json"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    sharded = []
    for i in range(2):
        out = tmp / f"repeat_sharded{i}"
        code, _, err = run_cli(capsys, *merge_args(z, out, "--seed", "5", "--shard-size", "30KB"))
        assert code == 0, err
        sharded.append(out)
    names = sorted(p.name for p in sharded[0].iterdir() if p.name != "report.json")
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    for name in names:
        if name == "README.md":  # the model card names its own directory (its load snippet runs as pasted)
            cards = [(d / name).read_text().replace(str(d), "OUT") for d in sharded]
            assert cards[0] == cards[1] and "OUT" in cards[0]
            continue
        assert (sharded[0] / name).read_bytes() == (sharded[1] / name).read_bytes(), name
