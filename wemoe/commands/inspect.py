"""``wemoe inspect``: what a checkpoint is, as wemoe reads it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wemoe.checkpoint import open_checkpoint


def run_inspect(path: str, arch: str | None) -> None:
    p = Path(path)
    config = None
    if p.is_dir() and (p / "config.json").is_file():
        config = json.loads((p / "config.json").read_text())
    if config and config.get("format") == "wemoe" and config.get("method") == "wemoe":
        from wemoe.saved import describe_merged

        click.echo(describe_merged(p, config))
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
        f"architecture:  width {a.width}, depth {a.depth}, heads {a.heads}, patch {a.patch_size}, image {a.image_size}, "
        f"mlp {a.mlp_width}, embed {a.embed_dim}",
        f"activation:    {a.activation}  (from: {a.source})",
        f"parameters:    {counts['mlp'] + counts['other']:,} (MLPs {counts['mlp']:,}, other {counts['other']:,})",
        f"dtype:         {str(ckpt.dtype('blocks.0.mlp.fc1.weight')).replace('torch.', '')}",
    ]
    if ckpt.match.ignored:
        lines.append(f"ignored:       {len(ckpt.match.ignored)} tensors outside the image tower")
    if config and config.get("format") == "wemoe":
        lines.append("merge config:")
        lines.append(json.dumps({k: config[k] for k in ("method", "parameters", "tasks", "dtype", "seed") if k in config}, indent=2))
    click.echo("\n".join(lines))
