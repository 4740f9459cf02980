"""Zero-shot classification heads from CLIP's text tower: the heads the paper's merges are judged with.

For each class, every prompt template is filled with the class name and encoded;
the embeddings are L2-normalised, averaged and normalised again; the head's
weight is the model's logit scale times these class embeddings, and it
normalises image features first (``Head.normalize``), so its logits are CLIP's
own zero-shot logits. This is task_vectors' ``build_classification_head``.

Heads come from ``wemoe heads`` (files) or from a ``clip:PATH`` source given to
``--heads`` / ``--task``, built on the fly from the task data's class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from wemoe.clip.templates import Templates, resolve_templates
from wemoe.clip.text_tower import TextTower, open_text_tower
from wemoe.clip.tokenizer import tokenize
from wemoe.data import read_classes
from wemoe.errors import WemoeError
from wemoe.model.heads import Head

# a head given as ``clip:PATH`` is built from that CLIP checkpoint's text tower
CLIP_SOURCE = "clip:"


def is_clip_source(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(CLIP_SOURCE)


MAX_TEXT = 1000  # characters of a class name or a template: CLIP's context holds 77 tokens


def check_class_names(names: Sequence[str], where: str | Path) -> list[str]:
    """Refuse no classes, blank names and duplicates: a head row per distinct class."""
    if not names:
        raise WemoeError("no class names (empty)", path=where)
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        if not name.strip():
            raise WemoeError(f"class {i} has an empty name", path=where)
        if len(name) > MAX_TEXT:  # CLIP reads 77 tokens; a longer name only costs tokenizer time and memory
            raise WemoeError(f"class {i} has a name of {len(name)} characters (at most {MAX_TEXT})", path=where)
        if name in seen:
            raise WemoeError(f"class '{name}' is listed twice (entries {seen[name]} and {i})", path=where)
        seen[name] = i
    return list(names)


def read_class_names(spec: str | Path, split: str = "test") -> list[str]:
    """Class names in label order: a text file (one per line), an image folder's class folders, or an .npz's ``classes``."""
    p = Path(spec)
    if p.is_dir() or p.suffix == ".npz":
        names = read_classes(p, split)
        if names is None:
            raise WemoeError("the .npz has no 'classes' array of class names", path=p)
        return check_class_names(names, p)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise WemoeError("no such file or directory", path=p) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WemoeError(f"cannot read class names ({getattr(exc, 'strerror', None) or type(exc).__name__})", path=p) from None
    while lines and not lines[-1].strip():
        lines.pop()
    return check_class_names([line.strip() for line in lines], p)


@torch.no_grad()  # not inference_mode: adaptation later back-propagates through the head's weight
def zero_shot_head(
    tower: TextTower,
    classes: Sequence[str],
    templates: Templates,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
    desc: str = "heads",
) -> Head:
    """The zero-shot head of ``classes``: logit scale x the normalised mean of normalised prompt embeddings."""
    prompts = [p for name in classes for p in templates.fill(name)]
    tokens = tokenize(prompts, tower.arch.context_length)
    model = tower.model.to(device)
    embeddings = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = tokens[start : start + batch_size].to(device)
            embeddings.append(F.normalize(model(chunk).float(), dim=-1).cpu())
            bar.update(len(chunk))
    per_class = torch.cat(embeddings).view(len(classes), len(templates.prompts), -1).mean(dim=1)
    weight = tower.logit_scale * F.normalize(per_class, dim=-1)
    return Head(weight.contiguous(), None, True, list(classes), f"{CLIP_SOURCE}{tower.path}")


def head_metadata(tower: TextTower, templates: Templates) -> dict[str, str]:
    """What a zero-shot head file records beside its weight: where it came from."""
    return {
        "source": f"zero-shot heads from the text tower of {tower.path}",
        "clip_sha256": tower.sha256,
        "templates": templates.name,
        "num_templates": str(len(templates.prompts)),
        "logit_scale": repr(tower.logit_scale),
    }


class ZeroShotHeads:
    """Builds heads for ``clip:PATH`` sources, opening each CLIP checkpoint once."""

    def __init__(self, arch: str | dict | None = None, device: str = "cpu", progress: bool = False):
        self.arch = arch
        self.device = device
        self.progress = progress
        self._towers: dict[Path, TextTower] = {}

    def tower(self, path: str | Path) -> TextTower:
        key = Path(path).resolve()
        if key not in self._towers:
            self._towers[key] = open_text_tower(path, self.arch)
        return self._towers[key]

    def head(self, source: str, task: str, classes: list[str] | None, data: str | Path) -> Head:
        """The head of ``task`` from ``source`` (``clip:PATH``) and the class names of its ``data``."""
        path = source[len(CLIP_SOURCE) :]
        if not path:
            raise WemoeError(f"task '{task}': '{CLIP_SOURCE}' needs the path of a full CLIP checkpoint after it")
        if classes is None:
            raise WemoeError(f"task '{task}': {CLIP_SOURCE} heads take the class names from the task's data, which has none (no 'classes' array)", path=data)
        check_class_names(classes, data)
        tower = self.tower(path)
        return zero_shot_head(tower, classes, resolve_templates(None, task), device=self.device, progress=self.progress, desc=task)


__all__ = ["ZeroShotHeads", "check_class_names", "head_metadata", "read_class_names", "zero_shot_head"]
