"""What the user says about each task, before anything is opened: names and paths.

Plain values at the bottom of the package, so the configuration front ends, the
input validation and the commands share one spelling of ``NAME=PATH`` and one
rule for duplicate names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wemoe.errors import WemoeError

# suffixes dropped from a file name to give the task's name when NAME= is left out
NAME_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its fine-tuned checkpoint, and optionally its head and (unlabeled) data."""

    name: str
    checkpoint: str
    head: str | None = None
    data: str | None = None


def split_named(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (the name is then the file's stem)."""
    if "=" in spec:
        name, value = spec.split("=", 1)
        if not name:
            raise WemoeError(f"empty task name in '{spec}'")
        return name, value
    p = Path(spec.rstrip("/"))
    stem = p.name
    for suffix in NAME_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem, spec


def check_unique(names: Sequence[str], what: str = "task") -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise WemoeError(f"{what} '{n}' is given twice")
        seen.add(n)


__all__ = ["NAME_SUFFIXES", "TaskSpec", "check_unique", "split_named"]
