"""Shared CLI plumbing: multi-value options, device and verbosity flags, notes on stderr."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from wemoe.core.runtime import DEVICES

GREEDY_OPTIONS = ("--tasks", "--heads", "--data", "--task")


def expand_greedy(args: list[str], greedy: tuple[str, ...]) -> list[str]:
    """Let ``--tasks a=x b=y`` mean ``--tasks a=x --tasks b=y``: values run to the next option.

    A greedy flag followed by no value is dropped, so "no tasks given" is
    reported as such rather than as the next option being taken for a value.
    """
    out: list[str] = []
    current: str | None = None
    for arg in args:
        if arg.startswith("-") and len(arg) > 1:
            current = arg if arg in greedy else None
            if current is None:
                out.append(arg)
            continue
        if current is not None:
            out.append(current)
        out.append(arg)
    return out


def device_option(fn: Callable) -> Callable:
    return click.option("--device", type=click.Choice(list(DEVICES)), default="auto", show_default=True, help="Where to compute.")(fn)


def split_option(fn: Callable) -> Callable:
    """``--split``, the same for every command that reads task data."""
    return click.option(
        "--split",
        default="test",
        show_default=True,
        help="Which split of the data: the sub-folder of that name of an image folder (else the folder itself), or x_SPLIT/y_SPLIT of an .npz.",
    )(fn)


def verbosity_options(fn: Callable) -> Callable:
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")(fn)
    fn = click.option("-v", "--verbose", count=True, help="More detail.")(fn)
    return fn


def progress_enabled(opts: dict[str, Any]) -> bool:
    return not opts.get("quiet")


def echo_note(opts: dict[str, Any], message: str) -> None:
    if not opts.get("quiet"):
        click.echo(message, err=True)
