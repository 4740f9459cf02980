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


def check_unique(names: Sequence[str], what: str = "task", values: Sequence[str] | None = None) -> None:
    """Refuse a name given twice; with ``values`` (the paths), say which two values gave it."""
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            if values is None:
                raise WemoeError(f"{what} '{n}' is given twice")
            first, second = values[seen[n]], values[i]
            if first == second:
                raise WemoeError(f"{what} '{n}' is given twice ('{first}')")
            raise WemoeError(f"{what} '{n}' is given twice: '{first}' and '{second}' both give the name '{n}' (name them apart with NAME=PATH)")
        seen[n] = i


__all__ = ["NAME_SUFFIXES", "TaskSpec", "check_unique", "split_named"]
