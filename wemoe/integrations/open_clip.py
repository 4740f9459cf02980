"""A wemoe model as the image tower of an open_clip CLIP model.

::

    import open_clip
    from wemoe.integrations.open_clip import use_merged_visual

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained="clip.safetensors")
    use_merged_visual(model, "merged/")        # WEMoE or static merge
    features = model.encode_image(preprocess(image)[None], normalize=True)
    text = model.encode_text(tokenizer(["a photo of a cat."]), normalize=True)   # the text tower is untouched

The CLIP model keeps its text tower, logit scale and transforms; the swap is
refused (one line) when its transforms would feed the merged encoder images of
another size or normalisation, or its text embeddings have another size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from wemoe.core.arch import ViTArch
from wemoe.errors import WemoeError
from wemoe.integrations.preprocessing import check_preprocessing
from wemoe.outputs.loading import load_output


class MergedVisual(nn.Module):
    """open_clip's ``visual`` interface around a wemoe encoder: ``forward(images)`` -> image embedding."""

    def __init__(self, encoder: nn.Module, preprocess_cfg: dict[str, Any]):
        super().__init__()
        self.encoder = encoder
        arch: ViTArch = encoder.arch
        self.output_dim = arch.output_dim
        # the attributes open_clip reads to build transforms (get_model_preprocess_cfg)
        self.image_size = (arch.image_size, arch.image_size)
        self.image_mean = tuple(arch.mean)
        self.image_std = tuple(arch.std)
        self.preprocess_cfg = preprocess_cfg

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        weight = next(self.encoder.parameters())
        return self.encoder(images.to(weight.device, weight.dtype))

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """open_clip's ``lock_image_tower``: the merged encoder is frozen as a whole."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)


def _text_embed_dim(clip_model: nn.Module) -> int | None:
    proj = getattr(clip_model, "text_projection", None)
    if proj is None:
        text = getattr(clip_model, "text", None)  # CustomTextCLIP keeps its text tower under .text
        proj = getattr(text, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    return None


def _preprocess_cfg(visual: nn.Module, arch: ViTArch) -> dict[str, Any]:
    """The CLIP model's preprocessing, checked against the merged encoder's (open_clip's defaults where unset)."""
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", None))
    mean = cfg.get("mean", getattr(visual, "image_mean", None))
    std = cfg.get("std", getattr(visual, "image_std", None))
    check_preprocessing(arch, size, mean, std, "the CLIP model's preprocessing")
    return {"interpolation": "bicubic", "resize_mode": "shortest", **cfg, "size": arch.image_size, "mean": tuple(arch.mean), "std": tuple(arch.std)}


def use_merged_visual(clip_model: nn.Module, merged: str | Path | nn.Module) -> nn.Module:
    """Replace ``clip_model.visual`` by the merged encoder (a wemoe output directory or a ``wemoe.load`` module).

    Returns ``clip_model`` (changed in place), on the device and dtype of its old image tower.
    """
    if isinstance(merged, (str, Path)):
        merged = load_output(merged)
    arch = getattr(merged, "arch", None)
    if not isinstance(arch, ViTArch):
        raise WemoeError("use_merged_visual takes a wemoe output directory or a module from wemoe.load")
    visual = getattr(clip_model, "visual", None)
    if not isinstance(visual, nn.Module) or not hasattr(clip_model, "encode_text"):
        raise WemoeError(f"{type(clip_model).__name__} is not an open_clip CLIP model (no visual tower and encode_text)")
    text_dim = _text_embed_dim(clip_model)
    if text_dim is not None and text_dim != arch.output_dim:
        raise WemoeError(f"the CLIP model's text embeddings have {text_dim} dimensions but the merged encoder's {arch.output_dim}")
    cfg = _preprocess_cfg(visual, arch)
    old = next(visual.parameters(), None)
    if old is not None:
        merged = merged.to(old.device, old.dtype)
    clip_model.visual = MergedVisual(merged.eval(), cfg)
    return clip_model


__all__ = ["MergedVisual", "use_merged_visual"]
