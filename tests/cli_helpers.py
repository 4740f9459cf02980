from __future__ import annotations

import pytest

from wemoe.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the real CLI entry point in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def merge_cli(capsys, base, tasks, method: str, out, *extra, heads=None, data=None) -> tuple[int, str, str]:
    """``wemoe merge`` in-process, quiet. ``tasks``/``heads``/``data``: a list of paths (tasks named t0, t1, ...),
    a dict name -> path, or already formatted NAME=PATH strings."""

    def named(values) -> list[str]:
        if isinstance(values, dict):
            return [f"{k}={v}" for k, v in values.items()]
        return [v if isinstance(v, str) and "=" in v else f"t{i}={v}" for i, v in enumerate(values)]

    flags = ["--base", base, "--tasks", *named(tasks), "--method", method, "--out", out, "-q"]
    if heads:
        flags += ["--heads", *named(heads)]
    if data:
        flags += ["--data", *named(data)]
    return run_cli(capsys, "merge", *flags, *extra)


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0, err
    # what a terminal shows: progress bars redraw with \r and are cleared on exit
    shown = [ln.split("\r")[-1] for ln in err.split("\n")]
    lines = [ln for ln in shown if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"


__all__ = ["run_cli", "merge_cli", "assert_one_line_error", "pytest"]
