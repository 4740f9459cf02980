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


def use_merged_weights(timm_model: nn.Module, merged: str | Path) -> nn.Module:
    """Load a static merge (or export) into ``timm_model``, checking activation and preprocessing first."""
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
    try:
        timm_model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WemoeError(f"the timm model does not match the merge ({str(exc).splitlines()[0].strip()})", path=merged) from None
    return timm_model


__all__ = ["use_merged_weights"]
