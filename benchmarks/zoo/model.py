"""The zoo's CLIP-layout ViT, its preprocessing, and safetensors I/O in open_clip's key scheme."""

from __future__ import annotations

import json
from typing import Any

import torch
from open_clip.transformer import VisionTransformer
from safetensors import safe_open
from safetensors.torch import save_file

from wemoe.core.arch import CLIP_MEAN, CLIP_STD

PREFIX = "visual."


def build_vit(arch: dict[str, Any]) -> VisionTransformer:
    """open_clip visual tower (GELU, learnable pos-embed, CLS pooling) from an arch dict."""
    return VisionTransformer(
        image_size=arch["image_size"],
        patch_size=arch["patch_size"],
        width=arch["width"],
        layers=arch["layers"],
        heads=arch["heads"],
        mlp_ratio=arch["mlp_ratio"],
        output_dim=arch["output_dim"],
    )


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N,32,32,3] -> float [N,3,32,32], /255 then CLIP mean/std; nothing else (the
    evaluation tool applies exactly this)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float().div(255) - mean) / std


def arch_metadata(arch: dict[str, Any]) -> dict[str, str]:
    return {
        "activation": "gelu",
        "image_size": str(arch["image_size"]),
        "patch_size": str(arch["patch_size"]),
        "width": str(arch["width"]),
        "layers": str(arch["layers"]),
        "heads": str(arch["heads"]),
        "mlp_ratio": str(arch["mlp_ratio"]),
        "output_dim": str(arch["output_dim"]),
    }


def save_encoder(model: VisionTransformer, path: str, arch: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    """Save as an open_clip-style checkpoint: every key prefixed ``visual.``, fp32."""
    sd = {PREFIX + k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    meta = arch_metadata(arch)
    meta.update(extra or {})
    save_file(sd, path, metadata=meta)


def load_state(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors with the ``visual.`` prefix stripped, and the header metadata."""
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        sd = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: f.get_tensor(k) for k in f.keys()}
    return sd, meta


def load_encoder(path: str) -> VisionTransformer:
    sd, meta = load_state(path)
    arch = {
        "image_size": int(meta["image_size"]),
        "patch_size": int(meta["patch_size"]),
        "width": int(meta["width"]),
        "layers": int(meta["layers"]),
        "heads": int(meta["heads"]),
        "mlp_ratio": float(meta.get("mlp_ratio", 4.0)),
        "output_dim": sd["proj"].shape[1],
    }
    model = build_vit(arch)
    model.load_state_dict(sd)
    return model


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)
