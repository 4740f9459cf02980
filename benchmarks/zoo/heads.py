"""Zero-shot-like heads: cosine class prototypes of frozen base features, fixed logit scale.

These play CLIP's text-derived head: fitted once on the *pretrained* encoder and then
frozen for fine-tuning and merging, so every model of a task shares one head.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from wemoe.model.heads import Head

from .model import preprocess


@torch.no_grad()
def features(model: torch.nn.Module, x: np.ndarray | torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Encoder outputs (CLS -> ln_post -> proj) for uint8 images [N,32,32,3]."""
    model.eval()
    x = torch.as_tensor(x)
    return torch.cat([model(preprocess(x[i : i + batch])) for i in range(0, len(x), batch)])


def balanced_subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of up to ``per_class`` samples of each class (deterministic)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)])


def fit_prototypes(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, n_classes: int, scale: float) -> torch.Tensor:
    """weight[c] = scale * normalize(mean_i normalize(f_i) over class c)."""
    f = F.normalize(features(model, x), dim=-1)
    protos = torch.stack([f[torch.as_tensor(y) == c].mean(0) for c in range(n_classes)])
    return scale * F.normalize(protos, dim=-1)


def save_head(path: str, weight: torch.Tensor, task: str, classes: list[str], extra: dict[str, str] | None = None) -> None:
    meta = {"normalize": "true", "task": task, "classes": json.dumps(list(classes), ensure_ascii=False)}
    meta.update(extra or {})
    save_file({"weight": weight.detach().float().contiguous()}, path, metadata=meta)


def load_head(path: str) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        bias = f.get_tensor("bias") if "bias" in f.keys() else None
        return f.get_tensor("weight"), bias, meta


def logits(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The zoo's heads are cosine heads: wemoe's ``Head`` with ``normalize`` set."""
    return Head(weight, bias, normalize=True).logits(feats)


@torch.no_grad()
def accuracy(model: torch.nn.Module, weight: torch.Tensor, x: np.ndarray, y: np.ndarray, bias: torch.Tensor | None = None) -> float:
    pred = logits(features(model, x), weight, bias).argmax(1)
    return float((pred == torch.as_tensor(y)).float().mean())
