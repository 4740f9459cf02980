"""Replay images from the base's own pretraining distribution, for feature-preserving fine-tunes.

A tiny ViT has no spare capacity: a plainly fine-tuned task vector rewrites features that
every other task's inputs also use, so adding a second task's vector costs the first task
accuracy (ATTEMPTS.md, attempt 4: at lambda 0.3 the worst vectors cost the other tasks 10-14
points on average). CLIP's fine-tunes stay local by sheer width. The zoo emulates that by keeping the encoder's outputs
on pretraining images where they were (feature distillation on a reference set, as in
LwF / ZSCL). The set is rendered from the recipe stored in the base checkpoint, so it never
contains task data.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from . import pretrain

CHUNK = 500


def base_recipe(base_path: str) -> dict[str, Any]:
    """Pretraining recipe recorded in the base checkpoint's metadata (else the committed recipe.json)."""
    with safe_open(base_path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "recipe" in meta:
        return json.loads(meta["recipe"])
    with open(pretrain.RECIPE_PATH) as f:
        return json.load(f)


def render(recipe: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """``n`` uint8 images [n,32,32,3] drawn like pretraining batches (training fonts only)."""
    bank = pretrain.build_bank(recipe)
    train_idx = np.flatnonzero(~bank["held"])
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    parts = [pretrain.sample_batch(bank, train_idx, min(CHUNK, n - i), rng, g, recipe["data"])[0] for i in range(0, n, CHUNK)]
    return torch.cat(parts).numpy()
