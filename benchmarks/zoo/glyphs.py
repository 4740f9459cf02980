"""Font discovery and glyph rendering shared by the pretraining set and the glyph tasks.

Fonts are split by family into a *pretraining* pool and a disjoint *task* pool so that
the letters / house-number tasks never show the base model a font it was trained on.
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_ROOTS = ("/usr/share/fonts/truetype", "/usr/share/fonts/opentype")
# Families reserved for the tasks (letters, house numbers); never used in pretraining.
TASK_FAMILIES = ("liberation", "urw-base35", "cantarell")
# Fonts without ordinary letter shapes (dingbats, symbol fonts, emoji-like).
_SKIP = ("D050000L", "StandardSymbols", "Z003", "NotoSansSymbols", "NotoColorEmoji", "NotoSansMath")


def _font_files() -> list[str]:
    files: list[str] = []
    for root in FONT_ROOTS:
        for ext in ("ttf", "otf"):
            files += glob.glob(os.path.join(root, "**", f"*.{ext}"), recursive=True)
    return sorted(f for f in files if not any(s in os.path.basename(f) for s in _SKIP))


def font_pool(kind: str) -> list[str]:
    """Font files of the 'task' or 'pretrain' pool (sorted, deterministic)."""
    files = _font_files()
    is_task = [any(f"/{fam}/" in f for fam in TASK_FAMILIES) for f in files]
    if kind == "task":
        return [f for f, t in zip(files, is_task) if t]
    if kind == "pretrain":
        return [f for f, t in zip(files, is_task) if not t]
    raise ValueError(kind)


@functools.cache
def _cmap(path: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    try:
        font = TTFont(path, lazy=True, fontNumber=0)
        cmap = font.getBestCmap() or {}
        font.close()
    except Exception:  # broken/unsupported font file: treat as covering nothing
        return frozenset()
    return frozenset(cmap)


def covers(path: str, char: str) -> bool:
    return ord(char) in _cmap(path)


@functools.lru_cache(maxsize=256)
def _pil_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def render_mask(path: str, char: str, box: int = 24, out: int = 32) -> np.ndarray | None:
    """Render ``char`` so its bounding box fits ``box`` px, centred in an ``out`` canvas.

    Returns a uint8 coverage mask, or None when the glyph is empty (missing / blank).
    """
    font = _pil_font(path, 64)
    canvas = Image.new("L", (160, 160), 0)
    ImageDraw.Draw(canvas).text((40, 30), char, fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    w, h = glyph.size
    if w * h < 16:
        return None
    s = box / max(w, h)
    glyph = glyph.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    res = Image.new("L", (out, out), 0)
    res.paste(glyph, ((out - glyph.width) // 2, (out - glyph.height) // 2))
    arr = np.asarray(res)
    return arr if arr.max() > 64 else None


def render_bank(chars: list[str], fonts: list[str], box: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (char, font) renderings available: masks [M,32,32] uint8, class ids, font ids."""
    masks, labels, font_ids = [], [], []
    for ci, ch in enumerate(chars):
        for fi, path in enumerate(fonts):
            if not covers(path, ch):
                continue
            m = render_mask(path, ch, box)
            if m is not None:
                masks.append(m)
                labels.append(ci)
                font_ids.append(fi)
    return np.stack(masks), np.asarray(labels, np.int64), np.asarray(font_ids, np.int64)
