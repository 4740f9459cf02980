"""The transformers ``config.json`` of an output written in the Hugging Face CLIP layout.

transformers loads a folder only with the model's own config beside the weights.
A plain output of an HF base gets its base's config: as it is for an image-tower
folder (``CLIPVisionModel[WithProjection]``), the image part of a full
``CLIPModel``'s (outputs hold the image tower only), or, for a base that came
without a config, one written from the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from wemoe.core.arch import ViTArch
from wemoe.core.runtime import dtype_name
from wemoe.schemes import TRANSFORMERS_SCHEMES

DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers 4 writes the first, 5 the second


def _from_arch(arch: ViTArch) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["CLIPVisionModelWithProjection" if arch.embed_dim is not None else "CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": arch.width,
        "intermediate_size": arch.mlp_width,
        "num_attention_heads": arch.heads,
        "num_hidden_layers": arch.depth,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "num_channels": 3,
        "hidden_act": arch.activation,
        "layer_norm_eps": arch.layer_norm_eps,
        "torch_dtype": "float32",
    }
    if arch.embed_dim is not None:
        config["projection_dim"] = arch.embed_dim
    return config


def vision_model_config(source: Mapping[str, Any] | None, arch: ViTArch, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json transformers needs to load an image tower of ``arch`` stored in ``dtype``.

    ``source``: the base folder's config.json; anything but a transformers config (which always
    names its ``model_type``) is ignored and the config is written from ``arch``.
    """
    if source is None or "model_type" not in source:
        config = _from_arch(arch)
    elif isinstance(source.get("vision_config"), Mapping):
        config = dict(source["vision_config"])
        config["model_type"] = "clip_vision_model"
        config["architectures"] = _from_arch(arch)["architectures"]
        if "projection_dim" in source:
            config["projection_dim"] = source["projection_dim"]
        for key in (*DTYPE_KEYS, "transformers_version"):
            if key in source:
                config[key] = source[key]
    else:
        config = dict(source)
    for key in DTYPE_KEYS:
        if key in config:
            config[key] = dtype_name(dtype)
    return config


def own_model_config(scheme: str, source: Mapping[str, Any] | None, arch: ViTArch, dtype: torch.dtype) -> dict[str, Any] | None:
    """The library's own config.json for a plain output in ``scheme``; None where the library needs none
    (timm and open_clip load bare state dicts), and the record keeps config.json."""
    return vision_model_config(source, arch, dtype) if scheme in TRANSFORMERS_SCHEMES else None


__all__ = ["own_model_config", "vision_model_config"]
