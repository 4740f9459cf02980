"""``wemoe inspect``: what a checkpoint is, as wemoe reads it."""

from __future__ import annotations

import json

import click

from wemoe.checkpoints.checkpoint import open_checkpoint
from wemoe.core.runtime import dtype_name
from wemoe.outputs.artifact import read_output
from wemoe.outputs.moe_module import describe_wemoe


def run_inspect(path: str, arch: str | None) -> None:
    record = read_output(path)
    if record is not None and record.is_moe:
        lines = [
            f"path:          {path}",
            f"architecture:  {record.architecture.summary()}",
            f"base scheme:   {record.scheme}",
            f"tasks:         {', '.join(record.tasks)}",
            *describe_wemoe(record),
            f"dtype:         {record.dtype}",
        ]
        click.echo("\n".join(lines))
        return
    ckpt = open_checkpoint(path, arch)
    counts = {"mlp": 0, "other": 0}
    for key in ckpt.keys():
        n = 1
        for d in ckpt.shape(key):
            n *= d
        counts["mlp" if ".mlp." in key else "other"] += n
    a = ckpt.arch
    lines = [
        f"path:          {path}",
        f"scheme:        {ckpt.scheme}" + (f" (prefix '{ckpt.prefix}')" if ckpt.prefix else ""),
        f"architecture:  {a.summary()}",
        f"activation:    {a.activation}  (from: {a.source})",
        f"parameters:    {counts['mlp'] + counts['other']:,} (MLPs {counts['mlp']:,}, other {counts['other']:,})",
        f"dtype:         {dtype_name(ckpt.dtype('blocks.0.mlp.fc1.weight'))}",
    ]
    if ckpt.match.ignored:
        lines.append(f"ignored:       {len(ckpt.match.ignored)} tensors outside the image tower")
    if record is not None:
        lines.append("merge config:")
        lines.append(json.dumps({k: record.raw[k] for k in ("method", "parameters", "tasks", "dtype", "seed") if k in record.raw}, indent=2))
    click.echo("\n".join(lines))
