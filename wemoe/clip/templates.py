"""Prompt templates for zero-shot heads: built-in sets, or a file with one template per line.

Every template holds ``{}`` where the class name goes. Built-in sets (facts,
re-typed): ``openai``, the 80 prompts OpenAI's CLIP paper used for ImageNet, the
generic choice; and the eight standard merging tasks' sets as published with
task_vectors (Ilharco et al., 2023), under the task's name. ``auto`` picks a
task's own set when its name is one of the eight (``stanford-cars`` and
``stanford_cars`` are Cars), else ``openai``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wemoe.errors import WemoeError

PLACEHOLDER = "{}"
AUTO = "auto"
GENERIC = "openai"

_OPENAI = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


BUILTIN: dict[str, tuple[str, ...]] = {
    GENERIC: _OPENAI,
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "resisc45": tuple(
        f"{view} of {article}{{}}."
        for article in ("", "a ", "the ")
        for view in ("satellite imagery", "aerial imagery", "satellite photo", "aerial photo", "satellite view", "aerial view")
    ),
    "eurosat": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.", "a centered satellite photo of the {}."),
    "svhn": ('a photo of the number: "{}".',),
    "gtsrb": (
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ),
    "mnist": ('a photo of the number: "{}".',),
    "dtd": tuple(f"a photo of {article} {{}} {kind}." for article in ("a", "the") for kind in ("texture", "pattern", "thing", "object")),
}
ALIASES = {"stanfordcars": "cars", "imagenet": GENERIC}


def _key(name: str) -> str:
    """Task names as people write them: ``Stanford-Cars``, ``stanford_cars`` -> ``stanfordcars``."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def builtin_name(name: str) -> str | None:
    """The built-in set ``name`` refers to, if any."""
    key = _key(name)
    key = ALIASES.get(key, key)
    return key if key in BUILTIN else None


@dataclass(frozen=True)
class Templates:
    name: str  # a built-in set's name or the file's path
    prompts: tuple[str, ...]

    def fill(self, class_name: str) -> list[str]:
        return [t.replace(PLACEHOLDER, class_name) for t in self.prompts]


def read_template_file(path: str | Path) -> Templates:
    """One template per line, each with ``{}``; blank lines are skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WemoeError(f"cannot read templates ({getattr(exc, 'strerror', None) or type(exc).__name__})", path=p) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if len(text) > 1000:  # CLIP's context holds 77 tokens
            raise WemoeError(f"template on line {number} has {len(text)} characters (at most 1000)", path=p)
        if PLACEHOLDER not in text:
            raise WemoeError(f"template on line {number} has no '{{}}' where the class name goes: {text!r}", path=p)
        prompts.append(text)
    if not prompts:
        raise WemoeError("no templates (the file is empty)", path=p)
    return Templates(str(p), tuple(prompts))


def resolve_templates(spec: str | None, task: str) -> Templates:
    """``--templates``: ``auto`` (default), a built-in set's name, or a file."""
    spec = spec or AUTO
    if spec == AUTO:
        name = builtin_name(task) or GENERIC
        return Templates(name, BUILTIN[name])
    name = builtin_name(spec)
    if name is not None and not Path(spec).is_file():
        return Templates(name, BUILTIN[name])
    if Path(spec).is_file():
        return read_template_file(spec)
    raise WemoeError(f"--templates must be auto, a built-in set ({', '.join(BUILTIN)}) or a file; '{spec}' is none of these")
