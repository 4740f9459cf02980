"""What an encoder expects of its input images, compared with what a pipeline feeds it.

A pipeline built for one model (open_clip's transforms, timm's data config) keeps
feeding images the way that model wanted; a merged encoder swapped in must want the
same, or its features are silently wrong. Checked here, refused with one line.
"""

from __future__ import annotations

from collections.abc import Sequence

from wemoe.core.arch import ViTArch
from wemoe.errors import WemoeError


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[-2]), int(size[-1]))


def check_preprocessing(arch: ViTArch, size: int | Sequence[int] | None, mean: Sequence[float] | None, std: Sequence[float] | None, pipeline: str) -> None:
    """Refuse a pipeline whose image size or normalisation differs from the merged encoder's."""
    if size is not None and as_size(size) != (arch.image_size, arch.image_size):
        got = "x".join(map(str, as_size(size)))
        raise WemoeError(f"{pipeline} feeds {got} images but the merged encoder takes {arch.image_size}x{arch.image_size}")
    for name, given, wanted in (("mean", mean, arch.mean), ("std", std, arch.std)):
        if given is not None and (len(given) != 3 or any(abs(float(g) - w) > 1e-6 for g, w in zip(given, wanted))):
            raise WemoeError(f"{pipeline} normalises with {name} {tuple(given)} but the merged encoder expects {tuple(wanted)}")
