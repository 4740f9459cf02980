"""What a model hub reads from a card: YAML front matter, and the library names of an architecture.

Hugging Face reads ``library_name``, ``base_model``, ``tags``, ``datasets``, ``metrics`` and
``model-index`` from the card's front matter. Hub ids are only written where they are
known: an input read from the hub's cache (``.../models--ORG--NAME/snapshots/...``) has one,
a local folder does not, and a made-up id would link the card to another model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from wemoe.core.arch import KNOWN_ARCHS
from wemoe.outputs.layout import MOE_SECTION

LIBRARY_OF_SCHEME = {"hf_clip": "transformers", "hf_clip_vision": "transformers", "open_clip": "open_clip", "timm": "timm"}
CLIP_SCHEMES = ("hf_clip", "hf_clip_vision", "open_clip")
ARCH_FIELDS = ("width", "depth", "heads", "patch_size", "image_size", "mlp_width", "embed_dim", "activation")


def hub_id(path: Any, kind: str = "models") -> str | None:
    """``ORG/NAME`` of a path inside the hub's cache (``kind``: models or datasets), else None."""
    m = re.search(rf"(?:^|[/\\]){kind}--([^/\\]+?)--([^/\\]+)(?:[/\\]|$)", str(path or ""))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def _known_name(arch: Mapping[str, Any], timm: bool) -> str | None:
    for name, fields in KNOWN_ARCHS.items():
        if name.startswith("vit_") == timm and all(arch.get(f) == fields.get(f) for f in ARCH_FIELDS):
            return name
    return None


def open_clip_name(arch: Mapping[str, Any]) -> str | None:
    """open_clip's model name for this image tower (``ViT-B-32-quickgelu``), when it is a known one."""
    return _known_name(arch, timm=False)


def timm_name(arch: Mapping[str, Any]) -> str | None:
    """timm's model name for this ViT (``vit_base_patch32_clip_quickgelu_224``), when it is a known one."""
    return _known_name(arch, timm=True)


def _base_models(record: Mapping[str, Any]) -> list[str]:
    inputs = record.get("inputs") or {}
    paths = [(inputs.get("base") or {}).get("path")] + [t.get("path") for t in (inputs.get("tasks") or {}).values()]
    ids = [i for i in (hub_id(p) for p in paths) if i]
    return list(dict.fromkeys(ids))


def front_matter(record: Mapping[str, Any], accuracy: Mapping[str, Mapping[str, Any]] | None, name: str) -> str:
    """The card's YAML front matter (with its ``---`` fences); deterministic for a given record."""
    scheme = str(record.get("scheme"))
    moe = isinstance(record.get(MOE_SECTION), Mapping)
    method = str(record.get("method"))
    meta: dict[str, Any] = {"library_name": "wemoe" if moe else LIBRARY_OF_SCHEME.get(scheme, "wemoe")}
    bases = _base_models(record)
    if bases:
        meta["base_model"] = bases
        if len(bases) > 1:
            meta["base_model_relation"] = "merge"
    tags = ["model-merging", "wemoe", method]
    tags += ["mixture-of-experts"] if moe else []
    tags += ["clip"] if scheme in CLIP_SCHEMES else []
    tags += ["vision", "image-feature-extraction"]
    meta["tags"] = list(dict.fromkeys(tags))
    meta["pipeline_tag"] = "image-feature-extraction"
    if accuracy:
        datasets = [d for d in (hub_id(r.get("data"), "datasets") for r in accuracy.values()) if d]
        if datasets:
            meta["datasets"] = list(dict.fromkeys(datasets))
        meta["metrics"] = ["accuracy"]
        results = []
        for task, r in accuracy.items():
            dataset = {"name": task, "type": hub_id(r.get("data"), "datasets") or task}
            metric = {"type": "accuracy", "value": round(100 * float(r["accuracy"]), 2), "name": "accuracy (%)"}
            results.append({"task": {"type": "image-classification"}, "dataset": dataset, "metrics": [metric]})
        meta["model-index"] = [{"name": name, "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, default_flow_style=False, allow_unicode=True) + "---\n\n"


__all__ = ["front_matter", "hub_id", "open_clip_name", "timm_name"]
