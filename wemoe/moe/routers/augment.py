"""Augmented views of adaptation images for fitting a task router (``--router-augment``).

A task router fitted on clean images only names the task of a corrupted image far less often
(on the zoo: 98% clean, 51-94% under the WEMoE paper's corruptions). ``augmix`` fits it on
AugMix views too (Hendrycks et al., ICLR 2020) with the operations that overlap common
corruptions left out (torchvision's ``all_ops=False``: no contrast, colour, brightness or
sharpness changes), so the robustness it buys is not bought from the test's own corruptions.
Views are seeded: the same seed gives the same router.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from wemoe.errors import UsageError

AUGMENTS = ("none", "augmix")
AUGMENT_HELP = "task routers: also fit on augmented views of the images: none, or augmix (AugMix without the operations common corruptions share)"

Views = Callable[[np.ndarray | list[np.ndarray], int], np.ndarray | list[np.ndarray]]


def augmix_views() -> Views:
    """A function (uint8 HWC images, seed) -> one AugMix view of each, same shapes."""
    try:
        from torchvision.transforms import AugMix
    except ImportError:  # pragma: no cover - torchvision comes with timm and open_clip
        raise UsageError("--router-augment augmix needs torchvision (pip install torchvision)") from None
    augmix = AugMix(all_ops=False)

    def views(images: np.ndarray | list[np.ndarray], seed: int) -> np.ndarray | list[np.ndarray]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = [augmix(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)).permute(1, 2, 0).numpy() for im in images]
        return np.stack(out) if isinstance(images, np.ndarray) else out

    return views


def augmenter(kind: str) -> Views | None:
    """The views of an ``--router-augment`` kind (one of ``AUGMENTS``, checked with the options; None for ``none``)."""
    return augmix_views() if kind == "augmix" else None


__all__ = ["AUGMENTS", "AUGMENT_HELP", "augmenter", "augmix_views"]
