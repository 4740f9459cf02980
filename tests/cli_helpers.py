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


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0, err
    # what a terminal shows: progress bars redraw with \r and are cleared on exit
    shown = [ln.split("\r")[-1] for ln in err.split("\n")]
    lines = [ln for ln in shown if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"


__all__ = ["run_cli", "assert_one_line_error", "pytest"]
