"""Batch image synthesis in torch: glyph masks -> coloured, jittered 32x32 RGB uint8.

Used both on the fly for pretraining augmentation and (seeded) to render glyph tasks,
so the two share one well-tested code path but draw from disjoint fonts/classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def smooth_noise(n: int, g: torch.Generator, cells: int = 4, size: int = 32) -> torch.Tensor:
    """Low-frequency RGB noise in [-1, 1], shape [n,3,size,size]."""
    coarse = torch.rand(n, 3, cells, cells, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def backgrounds(n: int, g: torch.Generator, clutter: float) -> torch.Tensor:
    """Random flat colour plus, with probability ``clutter``, gradients and blotches. [n,3,32,32] in [0,1]."""
    base = torch.rand(n, 3, 1, 1, generator=g)
    ang = _u(n, 0, 2 * math.pi, g)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    ramp = (torch.cos(ang)[:, None, None] * xs + torch.sin(ang)[:, None, None] * ys)[:, None]
    second = torch.rand(n, 3, 1, 1, generator=g)
    grad = base + (second - base) * (ramp + 1) / 2
    blot = smooth_noise(n, g, cells=int(torch.randint(3, 8, (1,), generator=g)))
    busy = (torch.rand(n, 1, 1, 1, generator=g) < clutter).float()
    amp = _u(n, 0.1, 0.35, g)[:, None, None, None]
    return (base * (1 - busy) + (grad + amp * blot) * busy).clamp(0, 1)


def _contrasting(bg_mean: torch.Tensor, g: torch.Generator, min_gap: float) -> torch.Tensor:
    """Random colours whose luminance differs from ``bg_mean`` [n,3] by at least ``min_gap``."""
    n = bg_mean.shape[0]
    fg = torch.rand(n, 3, generator=g)
    w = torch.tensor([0.299, 0.587, 0.114])
    gap = (fg - bg_mean) @ w
    sign = torch.where(gap == 0, torch.ones_like(gap), gap.sign())
    push = (min_gap - gap.abs()).clamp(min=0) * sign
    fg = fg + push[:, None]
    # if clamping undoes the push, flip to the other side of the background
    lum_bg = bg_mean @ w
    bad = ((fg.clamp(0, 1) @ w) - lum_bg).abs() < min_gap * 0.8
    flip = torch.where(lum_bg > 0.5, torch.zeros_like(lum_bg), torch.ones_like(lum_bg))
    fg[bad] = 0.15 * fg[bad] + 0.85 * flip[bad, None]
    return fg.clamp(0, 1)


def affine(masks: torch.Tensor, g: torch.Generator, rotate: float, scale: tuple[float, float], shift: float, shear: float = 0.15) -> torch.Tensor:
    """Random rotation/scale/shear/shift of [n,C,H,W] images (zero padding)."""
    n = masks.shape[0]
    a = _u(n, -rotate, rotate, g) * math.pi / 180
    s = 1.0 / _u(n, *scale, g)  # grid maps output->input, so invert the zoom
    sh = _u(n, -shear, shear, g)
    tx, ty = _u(n, -shift, shift, g), _u(n, -shift, shift, g)
    theta = torch.stack(
        [
            torch.stack([s * torch.cos(a), -s * torch.sin(a) + sh, tx], 1),
            torch.stack([s * torch.sin(a), s * torch.cos(a), ty], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(masks.shape), align_corners=False)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def stroke_jitter(m: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Randomly embolden (dilate) or thin (erode) a fraction ``p`` of masks [n,1,H,W]."""
    n = m.shape[0]
    r = torch.rand(n, generator=g)[:, None, None, None]
    bold = F.max_pool2d(m, 3, 1, 1)
    thin = -F.max_pool2d(-m, 2, 1, 0)
    thin = F.pad(thin, (0, 1, 0, 1))
    return torch.where(r < p / 2, bold, torch.where(r < p, 0.5 * (m + thin), m))


def compose(
    masks: torch.Tensor,
    g: torch.Generator,
    *,
    rotate: float = 12.0,
    scale: tuple[float, float] = (0.75, 1.1),
    shift: float = 0.12,
    clutter: float = 0.5,
    stroke_p: float = 0.3,
    noise: float = 0.04,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Render glyph coverage masks [n,32,32] uint8 as RGB uint8 images [n,32,32,3].

    ``extra`` (optional masks [n,32,32] in [0,1]) are drawn in the foreground colour
    before the glyph, e.g. distractor neighbours for house-number style images.
    """
    n = masks.shape[0]
    m = masks.float().div(255)[:, None]
    m = stroke_jitter(m, g, stroke_p)
    m = affine(m, g, rotate, scale, shift)
    bg = backgrounds(n, g, clutter)
    fg = _contrasting(bg.mean((2, 3)), g, 0.35)[:, :, None, None]
    img = bg
    if extra is not None:
        e = extra[:, None].float()
        fg2 = (fg + 0.25 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)).clamp(0, 1)
        img = img * (1 - e) + fg2 * e
    img = img * (1 - m) + fg * m
    sigma = _u(n, 0, noise, g)[:, None, None, None]
    img = img + sigma * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
