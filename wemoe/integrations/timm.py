"""A static merge's weights in a timm ``VisionTransformer``.

::

    import timm
    from wemoe.integrations.timm import use_merged_weights

    model = timm.create_model("vit_base_patch32_clip_quickgelu_224", num_classes=512)
    use_merged_weights(model, "merged/")       # any static merge or export, whatever its key scheme

wemoe's canonical layout is timm's, so every plain output (timm, open_clip or
Hugging Face scheme) loads with strict key matching. A WEMoE output routes every
image through its experts and has no timm equivalent: ``wemoe export`` one task, or
use ``wemoe.load``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from wemoe.checkpoints.checkpoint import open_checkpoint
from wemoe.errors import WemoeError
from wemoe.integrations.preprocessing import check_preprocessing
from wemoe.outputs.artifact import require_output

ZERO_WHEN_ABSENT = ("head.bias", "patch_embed.proj.bias")
ACTIVATION_CLASSES = {"gelu": "gelu", "quickgelu": "quick_gelu", "gelutanh": "gelu_tanh"}


def _activation(model: nn.Module) -> str | None:
    blocks = getattr(model, "blocks", None)
    act = getattr(getattr(blocks[0], "mlp", None), "act", None) if blocks else None
    return ACTIVATION_CLASSES.get(type(act).__name__.lower()) if act is not None else None


def _check_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], merged: str | Path) -> None:
    """Refuse a merge that does not fit the model in every key and shape before a single tensor is changed."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise WemoeError(f"the timm model does not match the merge: {'; '.join(problems)}; the model was not changed", path=merged)


def use_merged_weights(timm_model: nn.Module, merged: str | Path) -> nn.Module:
    """Load a static merge (or export) into ``timm_model``, checking activation and preprocessing first."""
    if not isinstance(timm_model, nn.Module):
        raise WemoeError(f"use_merged_weights takes a timm model (torch.nn.Module), got {type(timm_model).__name__}")
    if isinstance(merged, bool) or not isinstance(merged, (str, os.PathLike)):
        raise WemoeError(f"use_merged_weights takes a wemoe output directory (str or os.PathLike), got {type(merged).__name__}")
    record = require_output(merged)
    if record.is_moe:
        raise WemoeError("a WEMoE output routes each image through its experts; a timm model holds plain weights (`wemoe export` one task)", path=merged)
    checkpoint = open_checkpoint(merged)
    arch = checkpoint.arch
    act = _activation(timm_model)
    if act is not None and act != arch.activation:
        raise WemoeError(f"the timm model uses {act} but the merge was made with {arch.activation} (pick the matching timm model name)", path=merged)
    cfg = getattr(timm_model, "pretrained_cfg", None) or {}
    check_preprocessing(arch, cfg.get("input_size"), cfg.get("mean"), cfg.get("std"), "the timm model's data config")
    state = checkpoint.state_dict()
    own = timm_model.state_dict()
    for key in ZERO_WHEN_ABSENT:  # open_clip and HF layouts have no such bias: it is zero
        if key in own and key not in state:
            state[key] = torch.zeros_like(own[key])
    _check_fits(own, state, merged)  # load_state_dict would copy every tensor that fits before refusing the rest
    try:
        timm_model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WemoeError(f"the timm model does not match the merge ({str(exc).splitlines()[0].strip()})", path=merged) from None
    return timm_model


__all__ = ["use_merged_weights"]
