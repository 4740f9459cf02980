"""MLP activations. Not stored in any state dict, so always named explicitly."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from wemoe.errors import WemoeError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation OpenAI's CLIP weights were trained with."""
    return x * torch.sigmoid(1.702 * x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu,
    "quick_gelu": quick_gelu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise WemoeError(f"unknown activation '{name}' (known: {', '.join(sorted(ACTIVATIONS))})") from None
