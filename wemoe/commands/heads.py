"""``wemoe heads``: zero-shot classification heads from a full CLIP checkpoint's text tower.

Writes one head file per task, ``OUT/<NAME>.safetensors`` (``weight`` [classes,
embed], ``normalize`` set, class names and provenance in the metadata), which
``--heads`` and ``--task`` take like any other head file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch

from wemoe.clip.templates import resolve_templates
from wemoe.clip.text_tower import open_text_tower
from wemoe.clip.zeroshot import head_metadata, read_class_names, zero_shot_head
from wemoe.commands.options import echo_note, progress_enabled
from wemoe.core.runtime import resolve_device
from wemoe.core.tasks import check_unique
from wemoe.errors import UsageError, WemoeError
from wemoe.io.output import AtomicDirectory, check_destination, input_paths
from wemoe.model.heads import save_head


def parse_classes_spec(spec: str) -> tuple[str, str]:
    """``NAME=CLASSES`` -> (name, classes path); the name is required (it picks the built-in templates)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--task takes NAME=CLASSES (a class-name file, an image folder or an .npz), got '{spec}'")
    if name in (".", "..") or "/" in name or "\\" in name:
        raise UsageError(f"task name '{name}' cannot name a file (it becomes {name}.safetensors)")
    return name, path


def run_heads(opts: dict[str, Any]) -> None:
    specs = [parse_classes_spec(s) for s in opts.get("tasks") or ()]
    if not specs:
        raise click.UsageError("no --task given (NAME=CLASSES)")
    check_unique([n for n, _ in specs])
    inputs = input_paths(opts["clip"], opts.get("arch"), opts.get("templates"), *(path for _, path in specs))
    check_destination(opts["out"], bool(opts.get("force")), inputs)
    # validate every input (names, templates, the checkpoint) before encoding anything
    plans = [(name, path, read_class_names(path, opts.get("split") or "test"), resolve_templates(opts.get("templates"), name)) for name, path in specs]
    tower = open_text_tower(opts["clip"], opts.get("arch"))
    device = resolve_device(opts.get("device") or "auto")
    progress = progress_enabled(opts)
    with AtomicDirectory(opts["out"], bool(opts.get("force")), inputs) as tmp:
        for name, path, classes, templates in plans:
            head = zero_shot_head(tower, classes, templates, opts.get("batch_size") or 256, device, progress, desc=name)
            if not bool(torch.isfinite(head.weight).all()):  # never write a head that wemoe would refuse to read
                raise WemoeError(f"the head of task '{name}' holds NaN or Inf values; nothing was written", path=opts["clip"])
            save_head(tmp / f"{name}.safetensors", head, {**head_metadata(tower, templates), "task": name, "classes_from": str(path)})
            echo_note(opts, f"{name}: {len(classes)} classes x {len(templates.prompts)} templates ({templates.name})")
    echo_note(opts, f"wrote {len(plans)} head(s) to {Path(opts['out'])} (logit scale {tower.logit_scale:.4g}, text tower {tower.arch.summary()})")
