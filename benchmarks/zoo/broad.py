"""Pretraining-only image kinds that widen the base beyond single glyphs.

CLIP's pretraining covers the domains of its downstream tasks; a glyph-only base does
not cover textures, shapes or multi-object scenes, so fine-tuning on those tasks has to
rewrite attention. These kinds give the base those domains with classes that NO task
uses: twelve shapes disjoint from the shapes task, six texture families disjoint from
the textures task, and glyph *scatters* (several small copies of one glyph, labelled
with that glyph: aggregation over objects without ever teaching counts).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import compose
from .datasets import texture_coords

BROAD_SHAPES = ("pentagon", "heptagon", "octagon", "ellipse", "crescent", "arrow", "heart", "rhombus", "trapezoid", "parallelogram", "L-shape", "T-shape")
BROAD_TEXTURES = ("zigzag", "spiral", "trilattice", "cells", "herringbone", "plaid")


def _shape(k: int, rng: np.random.Generator, res: int = 128) -> np.ndarray:
    im = Image.new("L", (res, res), 0)
    d = ImageDraw.Draw(im)
    c, r = res / 2, res * 0.36 * rng.uniform(0.9, 1.05)
    ngon = lambda n: [(c + r * np.cos(2 * np.pi * i / n - np.pi / 2), c + r * np.sin(2 * np.pi * i / n - np.pi / 2)) for i in range(n)]
    name = BROAD_SHAPES[k]
    if name in ("pentagon", "heptagon", "octagon"):
        d.polygon(ngon({"pentagon": 5, "heptagon": 7, "octagon": 8}[name]), fill=255)
    elif name == "ellipse":
        e = rng.uniform(0.35, 0.6)
        d.ellipse([c - r, c - r * e, c + r, c + r * e], fill=255)
    elif name == "crescent":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        off = r * rng.uniform(0.35, 0.55)
        d.ellipse([c - r + off, c - r, c + r + off, c + r], fill=0)
    elif name == "arrow":
        a = r * rng.uniform(0.2, 0.3)
        d.rectangle([c - r, c - a, c + r * 0.2, c + a], fill=255)
        d.polygon([(c + r * 0.2, c - r * 0.7), (c + r, c), (c + r * 0.2, c + r * 0.7)], fill=255)
    elif name == "heart":
        q = r * 0.55
        d.ellipse([c - 2 * q, c - 1.6 * q, c, c + 0.4 * q], fill=255)
        d.ellipse([c, c - 1.6 * q, c + 2 * q, c + 0.4 * q], fill=255)
        d.polygon([(c - 1.93 * q, c - 0.2 * q), (c + 1.93 * q, c - 0.2 * q), (c, c + 1.9 * q)], fill=255)
    elif name == "rhombus":
        e = rng.uniform(0.45, 0.65)
        d.polygon([(c, c - r), (c + r * e, c), (c, c + r), (c - r * e, c)], fill=255)
    elif name == "trapezoid":
        t = rng.uniform(0.3, 0.55)
        d.polygon([(c - r * t, c - r * 0.6), (c + r * t, c - r * 0.6), (c + r, c + r * 0.6), (c - r, c + r * 0.6)], fill=255)
    elif name == "parallelogram":
        s = r * rng.uniform(0.35, 0.55)
        d.polygon([(c - r + s, c - r * 0.55), (c + r, c - r * 0.55), (c + r - s, c + r * 0.55), (c - r, c + r * 0.55)], fill=255)
    elif name == "L-shape":
        a = r * rng.uniform(0.45, 0.6)
        d.rectangle([c - r, c - r, c - r + a, c + r], fill=255)
        d.rectangle([c - r, c + r - a, c + r * 0.7, c + r], fill=255)
    else:  # T-shape
        a = r * rng.uniform(0.4, 0.55)
        d.rectangle([c - r, c - r, c + r, c - r + a], fill=255)
        d.rectangle([c - a / 2, c - r, c + a / 2, c + r], fill=255)
    return np.asarray(im.resize((32, 32), Image.LANCZOS))


def _texture(k: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx, u, v, p = texture_coords(rng, (5, 9))
    name = BROAD_TEXTURES[k]
    if name == "zigzag":
        tri = np.abs((u / p) % 2 - 1) * p
        return (np.abs(((v + tri) % p) - p / 2) < 1.0).astype(np.float32)
    if name == "spiral":
        cx, cy = rng.uniform(8, 24, 2)
        ang = np.arctan2(yy - cy, xx - cx)
        rad = np.hypot(xx - cx, yy - cy)
        return (np.sin(2 * np.pi * rad / p + rng.choice([-2, -1, 1, 2]) * ang) > 0.3).astype(np.float32)
    if name == "trilattice":  # three line families at 60 degrees (the grid task has two at 90)
        lines = [(u * np.cos(a) + v * np.sin(a)) % p < 1.1 for a in (0.0, np.pi / 3, 2 * np.pi / 3)]
        return (lines[0] | lines[1] | lines[2]).astype(np.float32)
    if name == "cells":
        pts = rng.uniform(0, 32, (int(rng.integers(8, 16)), 2))
        dd = np.sort(np.hypot(xx[..., None] - pts[:, 0], yy[..., None] - pts[:, 1]), axis=-1)
        return ((dd[..., 1] - dd[..., 0]) < 1.2).astype(np.float32)
    if name == "herringbone":
        col = np.floor(u / p)
        sign = np.where(col % 2 == 0, 1.0, -1.0)
        return (((v + sign * (u % p)) % (p * 0.8)) < p * 0.3).astype(np.float32)
    # plaid: two stripe sets of different periods and widths
    p2 = p * rng.uniform(1.4, 2.2)
    return np.clip(0.6 * ((u % p) < 1.5) + 0.6 * ((v % p2) < 2.5), 0, 1).astype(np.float32)


def shape_bank(variants: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 masks [len(BROAD_SHAPES) * variants, 32, 32] and their class indices."""
    rng = np.random.default_rng(seed)
    ks = np.repeat(np.arange(len(BROAD_SHAPES)), variants)
    return np.stack([_shape(int(k), rng) for k in ks]), ks


def texture_bank(variants: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ks = np.repeat(np.arange(len(BROAD_TEXTURES)), variants)
    return np.stack([(_texture(int(k), rng) * 255).round().astype(np.uint8) for k in ks]), ks


def scatter(masks: torch.Tensor, g: torch.Generator, copies: tuple[int, int] = (2, 4)) -> torch.Tensor:
    """Several small copies of each glyph mask [n,32,32] uint8 at random places (uint8 out)."""
    n = masks.shape[0]
    m = masks.float()[:, None] / 255
    k = torch.randint(copies[0], copies[1] + 1, (n,), generator=g)
    out = torch.zeros_like(m)
    for c in range(copies[1]):
        placed = compose.affine(m, g, rotate=12.0, scale=(0.32, 0.45), shift=0.62, shear=0.1)
        out = torch.maximum(out, placed * (k > c).float()[:, None, None, None])
    return (out[:, 0] * 255).round().to(torch.uint8)
