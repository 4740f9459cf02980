"""Tiny random-init ViTs built with the real constructors, and fine-tune-like copies."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from wemoe.io.safetensors_io import save_tensors

WIDTH, DEPTH, HEADS, PATCH, IMAGE, EMBED = 64, 2, 2, 8, 32, 16
ARCH = {"heads": HEADS, "activation": "gelu"}


def timm_vit(seed: int = 0, act: str = "gelu") -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=4,
        pre_norm=True,
        norm_layer=nn.LayerNorm,
        act_layer=act,
        num_classes=EMBED,
        global_pool="token",
    ).eval()


def open_clip_vit(seed: int = 0) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=4.0, output_dim=EMBED).eval()


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A fine-tune-like copy: each float tensor moved by noise of ~scale x its norm."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=g)
            out[k] = (v + scale * noise * (v.norm() / max(noise.norm().item(), 1e-12))).contiguous()
        else:
            out[k] = v.clone()
    return out


def hf_state_from_open_clip(oc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPVisionModelWithProjection layout, written out by hand (independent of wemoe.schemes)."""
    hf = {
        "vision_model.embeddings.class_embedding": oc["class_embedding"],
        "vision_model.embeddings.position_embedding.weight": oc["positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": oc["conv1.weight"],
        "vision_model.embeddings.position_ids": torch.arange(oc["positional_embedding"].shape[0]).unsqueeze(0),
        "vision_model.pre_layrnorm.weight": oc["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": oc["ln_pre.bias"],
        "vision_model.post_layernorm.weight": oc["ln_post.weight"],
        "vision_model.post_layernorm.bias": oc["ln_post.bias"],
        "visual_projection.weight": oc["proj"].t().contiguous(),
    }
    for n in range(DEPTH):
        hf.update(hf_block_state(oc, f"transformer.resblocks.{n}.", f"vision_model.encoder.layers.{n}."))
    return {k: v.contiguous() for k, v in hf.items()}


def hf_block_state(oc: dict[str, torch.Tensor], o: str, h: str) -> dict[str, torch.Tensor]:
    """One open_clip residual block (prefix ``o``) as a Hugging Face CLIP encoder layer (prefix ``h``), by hand."""
    q, k, v = oc[o + "attn.in_proj_weight"].chunk(3)
    qb, kb, vb = oc[o + "attn.in_proj_bias"].chunk(3)
    return {
        h + "layer_norm1.weight": oc[o + "ln_1.weight"],
        h + "layer_norm1.bias": oc[o + "ln_1.bias"],
        h + "self_attn.q_proj.weight": q,
        h + "self_attn.k_proj.weight": k,
        h + "self_attn.v_proj.weight": v,
        h + "self_attn.q_proj.bias": qb,
        h + "self_attn.k_proj.bias": kb,
        h + "self_attn.v_proj.bias": vb,
        h + "self_attn.out_proj.weight": oc[o + "attn.out_proj.weight"],
        h + "self_attn.out_proj.bias": oc[o + "attn.out_proj.bias"],
        h + "layer_norm2.weight": oc[o + "ln_2.weight"],
        h + "layer_norm2.bias": oc[o + "ln_2.bias"],
        h + "mlp.fc1.weight": oc[o + "mlp.c_fc.weight"],
        h + "mlp.fc1.bias": oc[o + "mlp.c_fc.bias"],
        h + "mlp.fc2.weight": oc[o + "mlp.c_proj.weight"],
        h + "mlp.fc2.bias": oc[o + "mlp.c_proj.bias"],
    }


def hf_config() -> dict:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": WIDTH,
        "num_hidden_layers": DEPTH,
        "num_attention_heads": HEADS,
        "patch_size": PATCH,
        "image_size": IMAGE,
        "intermediate_size": 4 * WIDTH,
        "hidden_act": "gelu",
        "projection_dim": EMBED,
        "layer_norm_eps": 1e-5,
    }


def write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {k: v.contiguous() for k, v in state.items()}, metadata)
    return path


def zoo(tmp: Path, kind: str = "open_clip", tasks: int = 3, prefix: str = "visual.") -> tuple[Path, list[Path], dict, list[dict]]:
    """A base and ``tasks`` fine-tune-like copies written in one library's layout."""
    if kind == "timm":
        base = {k: v.contiguous() for k, v in timm_vit().state_dict().items()}
    else:
        base = {prefix + k: v for k, v in open_clip_vit().state_dict().items()}
    meta = {"heads": str(HEADS), "activation": "gelu"}
    base_path = write(tmp / f"{kind}_base.safetensors", base, meta)
    states = [perturbed(base, seed=10 + i) for i in range(tasks)]
    paths = [write(tmp / f"{kind}_task{i}.safetensors", s, meta) for i, s in enumerate(states)]
    return base_path, paths, base, states


def tinted_tasks(tmp: Path, tasks: int = 3, images: int = 60, train: int = 40, seed: int = 2) -> tuple[Path, list[Path], dict, dict]:
    """``tasks`` fine-tune-like copies of a base with heads and data, where task t's images have channel t brighter
    (telling the tasks apart is learnable); returns the base, the task checkpoints, and heads and data by task name."""
    import numpy as np

    base, paths, _, _ = zoo(tmp, tasks=tasks)
    rng = np.random.default_rng(seed)
    heads, data = {}, {}
    for t in range(tasks):
        x = rng.integers(0, 120, (images, IMAGE, IMAGE, 3), dtype=np.uint8)
        x[..., t] += 120
        test = images - train
        np.savez(tmp / f"tinted{t}.npz", x_train=x[:train], y_train=rng.integers(0, 4, train), x_test=x[train:], y_test=rng.integers(0, 4, test))
        save_tensors(tmp / f"h{t}.safetensors", {"weight": torch.randn(4, EMBED, generator=torch.Generator().manual_seed(t))}, {"normalize": "true"})
        heads[f"t{t}"], data[f"t{t}"] = tmp / f"h{t}.safetensors", tmp / f"tinted{t}.npz"
    return base, paths, heads, data
