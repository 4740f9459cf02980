"""The Python API: ``wemoe.merge`` does exactly what ``wemoe merge`` does.

import wemoe
out = wemoe.merge(base="base.safetensors", tasks={"cars": "cars.safetensors", "mnist": "mnist.safetensors"},
                  method="task-arithmetic", out="merged/", lam=0.3)
out = wemoe.merge(config="merge.yaml")              # the same YAML `wemoe merge --config` reads
model = wemoe.load(out)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wemoe.merging.config import merge_config
from wemoe.merging.job import run_merge

Paths = Mapping[str, str | Path] | Sequence[str | Path] | None


def merge(
    config: str | Path | None = None,
    *,
    base: str | Path | None = None,
    tasks: Paths = None,
    method: str | None = None,
    out: str | Path | None = None,
    heads: Paths = None,
    data: Paths = None,
    arch: str | None = None,
    dtype: str | None = None,
    seed: int | None = None,
    shard_size: str | int | None = None,
    device: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
    **params: Any,
) -> Path | None:
    """Merge a base and its task checkpoints; returns the output directory (None for a dry run).

    ``tasks``, ``heads`` and ``data`` map task names to paths (a list of paths names
    each task by its file's stem). ``params`` are the method's parameters under
    their CLI names with underscores (``lam`` or ``**{"lambda": 0.3}``, ``ties_k``,
    ``steps``, ``lr``...). Values left out come from ``config`` (a YAML file), then
    from the method's defaults. Bad input raises ``wemoe.WemoeError`` before any
    compute; nothing is written unless the whole merge succeeds.
    """

    cfg = merge_config(
        config,
        base=base,
        tasks=tasks,
        method=method,
        out=out,
        heads=heads,
        data=data,
        arch=arch,
        dtype=dtype,
        seed=seed,
        shard_size=shard_size,
        device=device,
        force=force,
        dry_run=dry_run,
        quiet=quiet,
        **params,
    )
    return run_merge(cfg)


__all__ = ["merge"]
