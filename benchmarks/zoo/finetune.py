"""Gentle full fine-tuning of the encoder on one task, its prototype head frozen.

Low lr, few steps, no weight decay: task vectors stay small relative to the weights,
as for CLIP fine-tunes. With a replay set (``replay.py``) each step also pulls the
encoder's normalised outputs on pretraining images back to the base's, so the task
vector changes what this task needs and little else: what makes weight merging work.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .heads import features, logits
from .model import preprocess


def _shift_batch(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` px (edge replicate): cheap augmentation."""
    if max_shift <= 0:
        return x
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=g)
    return torch.stack([pad[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(n)])


def finetune(
    base: torch.nn.Module,
    weight: torch.Tensor,
    x: np.ndarray,
    y: np.ndarray,
    cfg: dict[str, Any],
    seed: int,
    desc: str = "finetune",
    progress: bool = True,
    replay: np.ndarray | None = None,
) -> torch.nn.Module:
    """Return a fine-tuned copy of ``base`` (AdamW, linear warmup then cosine to 0).

    ``replay`` (uint8 images) with ``cfg["replay_alpha"] > 0`` adds
    ``alpha * |normalize(f(r)) - normalize(f_base(r))|^2`` on ``cfg["replay_batch"]`` of them per step."""
    alpha = float(cfg.get("replay_alpha", 0.0)) if replay is not None else 0.0
    if alpha > 0:
        xr = torch.as_tensor(replay)
        target = F.normalize(features(base, xr), dim=-1)
        rng_r = np.random.default_rng([seed, 1])
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    steps, warm = cfg["steps"], cfg["warmup"]
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=2, disable=not progress)
    for step in bar:
        lr = cfg["lr"] * ((step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.from_numpy(rng.integers(0, len(xt), cfg["batch"]))
        inp = _shift_batch(preprocess(xt[idx]), cfg["max_shift"], g)
        if alpha > 0:
            # one forward over task and replay images (LayerNorm only: rows do not interact)
            ri = torch.from_numpy(rng_r.integers(0, len(xr), cfg["replay_batch"]))
            out = model(torch.cat([inp, preprocess(xr[ri])]))
            drift = F.normalize(out[len(idx) :], dim=-1) - target[ri]
            loss = F.cross_entropy(logits(out[: len(idx)], weight), yt[idx]) + alpha * drift.pow(2).sum(1).mean()
        else:
            loss = F.cross_entropy(logits(model(inp), weight), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()
