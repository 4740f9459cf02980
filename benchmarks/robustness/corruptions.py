"""The seven test-image corruptions of the WEMoE paper's robustness study, at one fixed severity.

Each takes a batch of RGB uint8 images (N, H, W, 3) and a ``numpy`` generator and returns a
batch of the same shape and dtype, so a run is deterministic for its seed. The severities are
chosen for the zoo's 32x32 images to sit near the middle of ImageNet-C's five levels: visible,
and far from erasing the image.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, sigma: float = 0.08) -> np.ndarray:
    """Additive Gaussian noise, ``sigma`` of the full range."""
    return _to_uint8(x.astype(np.float32) + rng.normal(0.0, 255.0 * sigma, size=x.shape))


def impulse_noise(x: np.ndarray, rng: np.random.Generator, amount: float = 0.03) -> np.ndarray:
    """Salt-and-pepper noise: ``amount`` of the pixel values set to 0 or 255."""
    out = x.copy()
    hit = rng.random(x.shape) < amount
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255).astype(np.uint8)
    return out


def motion_blur(x: np.ndarray, rng: np.random.Generator, length: int = 5) -> np.ndarray:
    """Each image smeared along a line of ``length`` pixels at one of four directions."""
    out = np.empty_like(x)
    half = length // 2
    steps = np.arange(-half, half + 1)
    for i, img in enumerate(x.astype(np.float32)):
        dy, dx = [(0, 1), (1, 1), (1, 0), (1, -1)][int(rng.integers(4))]
        padded = np.pad(img, ((half, half), (half, half), (0, 0)), mode="edge")
        h, w = img.shape[:2]
        acc = sum(padded[half + s * dy : half + s * dy + h, half + s * dx : half + s * dx + w] for s in steps)
        out[i] = _to_uint8(acc / len(steps))
    return out


def pixelate(x: np.ndarray, rng: np.random.Generator, factor: float = 0.5) -> np.ndarray:
    """Box-downsampled to ``factor`` of the side, then enlarged back with nearest neighbours."""
    out = np.empty_like(x)
    h, w = x.shape[1:3]
    small = (max(1, round(w * factor)), max(1, round(h * factor)))
    for i, img in enumerate(x):
        out[i] = np.asarray(Image.fromarray(img).resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.NEAREST))
    return out


def spatter(x: np.ndarray, rng: np.random.Generator, drops: int = 6, alpha: float = 0.7) -> np.ndarray:
    """Opaque-ish drops of muddy colour (small discs at random places) over each image."""
    n, h, w = x.shape[:3]
    yy, xx = np.mgrid[0:h, 0:w]
    out = x.astype(np.float32)
    for i in range(n):
        mask = np.zeros((h, w), dtype=bool)
        for _ in range(drops):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.0, 0.09 * max(h, w) + 1.0)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mud = np.array([90.0, 70.0, 50.0]) + rng.normal(0, 15, size=3)
        out[i][mask] = (1 - alpha) * out[i][mask] + alpha * mud
    return _to_uint8(out)


def contrast(x: np.ndarray, rng: np.random.Generator, keep: float = 0.4) -> np.ndarray:
    """Each image pulled toward its own mean colour, keeping ``keep`` of its contrast."""
    f = x.astype(np.float32)
    mean = f.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8(mean + keep * (f - mean))


def jpeg(x: np.ndarray, rng: np.random.Generator, quality: int = 15) -> np.ndarray:
    """Encoded and decoded as a JPEG at ``quality``."""
    out = np.empty_like(x)
    for i, img in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


CORRUPTIONS: dict[str, Corruption] = {
    "motion_blur": motion_blur,
    "impulse_noise": impulse_noise,
    "gaussian_noise": gaussian_noise,
    "pixelate": pixelate,
    "spatter": spatter,
    "contrast": contrast,
    "jpeg": jpeg,
}


def corrupt(name: str, images: np.ndarray, seed: int) -> np.ndarray:
    """``images`` under corruption ``name``, the same for the same seed."""
    return CORRUPTIONS[name](images, np.random.default_rng(seed))


__all__ = ["CORRUPTIONS", "corrupt"]
