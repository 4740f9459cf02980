"""Pretrain the zoo's base encoder on a broad glyph corpus that no task uses.

~330 classes (Latin lowercase, non-look-alike Greek/Cyrillic, symbols, Hebrew, Armenian,
Georgian, Devanagari, Thai) from the *pretraining* font pool, composited on the fly with
random colours, clutter and affine jitter. Latin capitals and digits are excluded: they
are tasks. Held-out fonts give an honest accuracy. Run: ``python -m benchmarks.zoo.pretrain``
(rebuilds ``base.safetensors`` + ``recipe.json`` from ``recipe.json``: the full 1,800-step
schedule at 2 threads took 24 min on the 2-core machine; held-out-font top-1 63%).
``--broad`` adds the pretraining-only shapes, textures and glyph scatters of ``broad.py``
(attempt 3 in ATTEMPTS.md; not the committed base).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import broad, compose, glyphs
from .model import build_vit, preprocess, save_encoder

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_PATH = os.path.join(HERE, "base.safetensors")
RECIPE_PATH = os.path.join(HERE, "recipe.json")

CHAR_GROUPS: dict[str, str] = {
    "latin_lower": "abcdefghijklmnopqrstuvwxyz",
    "greek_lower": "αβγδεζηθλμξπρσςφχψω",
    "greek_upper": "ΓΔΘΛΞΠΣΦΨΩ",
    "cyrillic_upper": "БГДЖЗИЙЛПФЦЧШЩЪЫЬЭЮЯ",
    "cyrillic_lower": "бгджзилпфцчшщъыьэюя",
    "symbols": "+×÷=≠<>≤≥∞∑∫√∂∇∈∩∪⊂⊃∀∃¬∧∨#$%&@*?!§¶©®€£¥←→↑↓↔♠♣♥♦♪~^{}[]()/\\|",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשת",
    "armenian": "աբգդեզէըթժիլխծկհձղճմյնշոչպջռսվտրցւփքօֆ",
    "georgian": "აბგდევზთიკლმნოპჟრსტუფქღყშჩცძწჭხჯჰ",
    "devanagari": "अआइईउऊऋएऐओऔकखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह",
    "thai": "กขคฆงจฉชซฌญฎฏฐฑฒณดตถทธนบปผฝพฟภมยรลวศษสหฬอฮ",
}

DEFAULT_RECIPE: dict[str, Any] = {
    "arch": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 6, "heads": 4, "mlp_ratio": 4.0, "output_dim": 128},
    "data": {
        "char_groups": CHAR_GROUPS,
        "font_pool": "pretrain",
        "heldout_font_every": 7,
        "box": 24,
        "clutter": 0.5,
        "rotate": 12.0,
        "scale": [0.7, 1.1],
        "shift": 0.12,
    },
    "train": {
        "seed": 0,
        "steps": 1800,
        "stop_after": 1800,
        "batch": 128,
        "lr": 1e-3,
        "min_lr": 1e-5,
        "warmup": 150,
        "weight_decay": 0.05,
        "label_smoothing": 0.1,
        "cos_scale": 16.0,
        "threads": 2,
    },
}


BROAD_DEFAULT: dict[str, Any] = {"seed": 0, "shape_variants": 24, "texture_variants": 48, "shape_frac": 0.125, "texture_frac": 0.125, "scatter_frac": 0.2}


def class_chars(groups: dict[str, str]) -> list[str]:
    chars: list[str] = []
    for s in groups.values():
        chars += [c for c in s if c not in chars]
    return chars


def build_bank(recipe: dict[str, Any]) -> dict[str, np.ndarray]:
    """Render every (class, font) mask; split fonts into train / held-out by index.

    With a ``broad`` recipe part, shape and texture banks are added as extra classes after
    the glyph classes (they never enter the held-out glyph score).
    """
    d = recipe["data"]
    chars = class_chars(d["char_groups"])
    fonts = glyphs.font_pool(d["font_pool"])
    masks, labels, fids = glyphs.render_bank(chars, fonts, d["box"])
    held = (fids % d["heldout_font_every"]) == 0
    # classes with few fonts keep all fonts in training; they are left out of the held-out score
    per_class = np.bincount(labels, minlength=len(chars))
    held &= per_class[labels] >= 10
    bank = {"masks": masks, "labels": labels, "held": held, "n_classes": np.array(len(chars))}
    b = d.get("broad")
    if b:
        sm, sk = broad.shape_bank(b["shape_variants"], b["seed"])
        tm, tk = broad.texture_bank(b["texture_variants"], b["seed"] + 1)
        n_glyph = len(chars)
        bank.update(
            shape_masks=sm,
            shape_labels=sk + n_glyph,
            texture_masks=tm,
            texture_labels=tk + n_glyph + len(broad.BROAD_SHAPES),
            n_classes=np.array(n_glyph + len(broad.BROAD_SHAPES) + len(broad.BROAD_TEXTURES)),
        )
    return bank


class CosineHead(torch.nn.Module):
    """Cosine classifier with fixed scale: shapes the embedding for prototype heads later."""

    def __init__(self, dim: int, n: int, scale: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, dim) * 0.02)
        self.scale = scale

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).T


def _sample(bank: dict[str, np.ndarray], idx: np.ndarray, g: torch.Generator, d: dict[str, Any]) -> torch.Tensor:
    m = torch.from_numpy(bank["masks"][idx])
    return compose.compose(m, g, rotate=d["rotate"], scale=tuple(d["scale"]), shift=d["shift"], clutter=d["clutter"])


def sample_batch(
    bank: dict[str, np.ndarray], train_idx: np.ndarray, batch: int, rng: np.random.Generator, g: torch.Generator, d: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch (uint8 images, labels): glyphs, plus the broad kinds when the recipe has them."""
    b = d.get("broad")
    if not b:
        idx = train_idx[rng.integers(0, len(train_idx), batch)]
        return _sample(bank, idx, g, d), torch.from_numpy(bank["labels"][idx])
    n_shape, n_tex = round(batch * b["shape_frac"]), round(batch * b["texture_frac"])
    n_glyph = batch - n_shape - n_tex
    n_scatter = round(n_glyph * b["scatter_frac"])
    idx = train_idx[rng.integers(0, len(train_idx), n_glyph)]
    plain = _sample(bank, idx[n_scatter:], g, d)
    scattered = compose.compose(
        broad.scatter(torch.from_numpy(bank["masks"][idx[:n_scatter]]), g), g, rotate=0.0, scale=(1.0, 1.0), shift=0.0, clutter=d["clutter"]
    )
    si = rng.integers(0, len(bank["shape_labels"]), n_shape)
    shapes = compose.compose(torch.from_numpy(bank["shape_masks"][si]), g, rotate=180.0, scale=(0.45, 1.0), shift=0.2, clutter=d["clutter"], stroke_p=0.0)
    ti = rng.integers(0, len(bank["texture_labels"]), n_tex)
    tex = compose.compose(torch.from_numpy(bank["texture_masks"][ti]), g, rotate=0.0, scale=(1.0, 1.0), shift=0.0, clutter=0.0, stroke_p=0.0, noise=0.05)
    x = torch.cat([scattered, plain, shapes, tex])
    y = torch.from_numpy(np.concatenate([bank["labels"][idx], bank["shape_labels"][si], bank["texture_labels"][ti]]))
    return x, y


def lr_at(step: int, t: dict[str, Any]) -> float:
    if step < t["warmup"]:
        return t["lr"] * (step + 1) / t["warmup"]
    p = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * p))


@torch.no_grad()
def evaluate(model: torch.nn.Module, head: CosineHead, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 256):
        correct += (head(model(preprocess(x[i : i + 256]))).argmax(1) == y[i : i + 256]).sum().item()
    model.train()
    return correct / len(x)


def pretrain(recipe: dict[str, Any], out: str = BASE_PATH, log_every: int = 50, snapshot: str | None = None) -> dict[str, Any]:
    """Train the base from scratch; ``snapshot`` (optional path) gets a copy at every evaluation."""
    t = recipe["train"]
    d = recipe["data"]
    torch.set_num_threads(t["threads"])
    torch.manual_seed(t["seed"])
    t0 = time.time()
    bank = build_bank(recipe)
    n_cls = int(bank["n_classes"])
    train_idx = np.flatnonzero(~bank["held"])
    held_idx = np.flatnonzero(bank["held"])
    ge = torch.Generator().manual_seed(t["seed"] + 1)
    rng = np.random.default_rng(t["seed"])
    ev_idx = rng.choice(held_idx, 2000, replace=len(held_idx) < 2000)
    x_ev, y_ev = _sample(bank, ev_idx, ge, d), torch.from_numpy(bank["labels"][ev_idx])
    print(f"bank: {len(bank['labels'])} masks, {n_cls} classes, {len(train_idx)} train / {len(held_idx)} held-out ({time.time() - t0:.0f}s)", flush=True)

    model = build_vit(recipe["arch"])
    head = CosineHead(recipe["arch"]["output_dim"], n_cls, t["cos_scale"])
    params = list(model.parameters()) + list(head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"], betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(t["seed"] + 2)
    run_loss, run_acc = 0.0, 0.0
    # ``steps`` sets the lr schedule; ``stop_after`` (<= steps) ends training early on that schedule.
    for step in range(t.get("stop_after", t["steps"])):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, t)
        x, y = sample_batch(bank, train_idx, t["batch"], rng, g, d)
        x = preprocess(x)
        logits = head(model(x))
        loss = F.cross_entropy(logits, y, label_smoothing=t["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run_loss = 0.98 * run_loss + 0.02 * loss.item() if step else loss.item()
        run_acc = 0.98 * run_acc + 0.02 * (logits.argmax(1) == y).float().mean().item()
        if (step + 1) % log_every == 0 or step + 1 == t["steps"]:
            msg = f"step {step + 1}/{t['steps']} loss {run_loss:.3f} train-acc~{run_acc:.3f} lr {lr_at(step, t):.2e} {time.time() - t0:.0f}s"
            if (step + 1) % (log_every * 10) == 0 or step + 1 == t.get("stop_after", t["steps"]):
                msg += f" heldout-acc {evaluate(model, head, x_ev, y_ev):.3f}"
                if snapshot:
                    save_encoder(model, snapshot, recipe["arch"])
            print(msg, flush=True)
    acc = evaluate(model, head, x_ev, y_ev)
    elapsed = time.time() - t0
    n_params = sum(p.numel() for p in model.parameters())
    save_encoder(model, out, recipe["arch"], {"recipe": json.dumps(recipe, sort_keys=True, ensure_ascii=False)})
    return {
        "heldout_top1": round(acc, 4),
        "heldout_samples": len(ev_idx),
        "n_classes": n_cls,
        "n_masks": int(len(bank["labels"])),
        "n_params": n_params,
        "seconds": round(elapsed),
        "threads": t["threads"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=None, help="override schedule length (experiments only)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop early on the schedule (experiments only)")
    ap.add_argument("--out", default=BASE_PATH)
    ap.add_argument("--recipe-out", default=RECIPE_PATH)
    ap.add_argument("--snapshot", default=None, help="path for intermediate checkpoints")
    ap.add_argument("--threads", type=int, default=None, help="override torch threads")
    ap.add_argument("--broad", action="store_true", help="add the pretraining-only shapes, textures and glyph scatters (benchmarks/zoo/broad.py)")
    args = ap.parse_args()
    if args.broad and (os.path.abspath(args.out) == BASE_PATH or os.path.abspath(args.recipe_out) == RECIPE_PATH):
        ap.error("--broad is an experiment (ATTEMPTS.md, attempt 3): give --out and --recipe-out outside the committed base and recipe")
    recipe = json.loads(json.dumps(DEFAULT_RECIPE))
    if os.path.exists(RECIPE_PATH) and args.steps is None:
        recipe = {k: v for k, v in json.load(open(RECIPE_PATH)).items() if k in DEFAULT_RECIPE}
    if args.steps is not None:
        recipe["train"]["steps"] = args.steps
    if args.stop_after is not None:
        recipe["train"]["stop_after"] = args.stop_after
    if args.threads is not None:
        recipe["train"]["threads"] = args.threads
    if args.broad:
        recipe["data"]["broad"] = dict(BROAD_DEFAULT)
    result = pretrain(recipe, args.out, snapshot=args.snapshot)
    print(json.dumps(result), flush=True)
    with open(args.recipe_out, "w") as f:
        json.dump({**recipe, "result": result}, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
