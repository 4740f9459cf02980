"""Classification heads: frozen linear classifiers on the encoder's image embedding.

A merged encoder is always judged with each task's own head. Heads are read
from safetensors or torch files, including task_vectors' pickled
``ClassificationHead`` modules (through the restricted unpickler, never by
executing the pickle), whose ``normalize`` flag means features are
L2-normalised before the linear layer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from wemoe.core import json_text
from wemoe.errors import WemoeError
from wemoe.io.safetensors_io import SafetensorsFile, load_tensors, save_tensors
from wemoe.io.sources import open_source

TRUE = {"1", "true", "yes", "True"}
# a head given as ``clip:PATH`` is built from that CLIP checkpoint's text tower (``wemoe.clip.zeroshot``)
CLIP_SOURCE = "clip:"


def is_clip_source(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(CLIP_SOURCE)


@dataclass
class Head:
    weight: torch.Tensor  # [classes, features]
    bias: torch.Tensor | None = None
    normalize: bool = False
    classes: list[str] | None = None
    path: str | None = None

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        w = self.weight.to(features.device, features.dtype)
        b = self.bias.to(features.device, features.dtype) if self.bias is not None else None
        return F.linear(features, w, b)

    def check_features(self, feature_dim: int, task: str) -> None:
        if self.in_features != feature_dim:
            raise WemoeError(
                f"head of task '{task}' takes {self.in_features} features but the encoder outputs {feature_dim}",
                path=self.path,
            )


def _find(tensors: Mapping[str, torch.Tensor], name: str) -> str | None:
    if name in tensors:
        return name
    hits = [k for k in tensors if k.endswith("." + name)]
    return hits[0] if len(hits) == 1 else None


def load_head(path: str | Path) -> Head:
    """Read a head file: tensor ``weight`` [classes, features] and optional ``bias``."""
    src = open_source(path)
    keys = src.keys()
    tensors = {k: src.get(k) for k in keys}
    wkey = _find(tensors, "weight")
    if wkey is None:
        raise WemoeError(f"no 'weight' tensor in head file (found: {', '.join(keys[:5])})", path=path)
    weight = tensors[wkey].float()
    if weight.ndim != 2:
        raise WemoeError(f"head weight must be 2-D [classes, features], got {list(weight.shape)}", path=path, tensor=wkey)
    bkey = _find(tensors, "bias")
    bias = tensors[bkey].float() if bkey is not None else None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise WemoeError(f"head bias shape {list(bias.shape)} does not match {weight.shape[0]} classes", path=path, tensor=bkey)
    if not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
        raise WemoeError("head contains NaN or Inf values", path=path)
    meta = src.metadata
    classes = None
    if "classes" in meta:
        try:
            classes = [str(c) for c in json_text.loads(meta["classes"])]
        except (json.JSONDecodeError, TypeError):
            classes = None
    return Head(weight, bias, meta.get("normalize", "false") in TRUE, classes, str(path))


def save_head(path: Path, head: Head, metadata: Mapping[str, str] | None = None) -> None:
    """One head file that :func:`load_head` reads back: ``weight`` (and ``bias``), ``normalize`` and ``classes``."""
    tensors = {"weight": head.weight.float().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.float().contiguous()
    meta = {"normalize": "true" if head.normalize else "false", **(metadata or {})}
    if head.classes is not None:
        meta["classes"] = json.dumps(head.classes)
    save_tensors(path, tensors, meta)


def save_heads(path: Path, heads: Mapping[str, Head]) -> None:
    """All heads of a merged model in one file, keyed ``<task>.weight`` / ``<task>.bias``."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name, h in heads.items():
        tensors[f"{name}.weight"] = h.weight.float().contiguous()
        if h.bias is not None:
            tensors[f"{name}.bias"] = h.bias.float().contiguous()
        meta[f"{name}.normalize"] = "true" if h.normalize else "false"
        if h.classes is not None:
            meta[f"{name}.classes"] = json.dumps(h.classes)
    save_tensors(path, tensors, meta)


def stored_head_names(path: Path) -> list[str]:
    """The tasks whose heads ``save_heads`` stored in ``path``, read from the header only."""
    return sorted({k.rsplit(".", 1)[0] for k in SafetensorsFile(path).keys()})


def load_heads(path: Path) -> dict[str, Head]:
    tensors, meta = load_tensors(path)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    out = {}
    for n in names:
        classes = json.loads(meta[f"{n}.classes"]) if f"{n}.classes" in meta else None
        out[n] = Head(tensors[f"{n}.weight"], tensors.get(f"{n}.bias"), meta.get(f"{n}.normalize") == "true", classes, str(path))
    return out
