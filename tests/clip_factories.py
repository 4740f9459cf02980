"""A tiny random-init open_clip CLIP (image and text towers) and the same weights as an HF CLIPModel folder.

The HF key conversion is written out by hand here, independent of ``wemoe.schemes``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from factories import DEPTH, EMBED, HEADS, IMAGE, PATCH, WIDTH, hf_block_state, hf_config, hf_state_from_open_clip, perturbed, write, zoo

TEXT_WIDTH, TEXT_HEADS, TEXT_DEPTH, CONTEXT, VOCAB = 128, 2, 2, 77, 49408  # heads = width // 64, as every OpenAI-style CLIP
META = {"heads": str(HEADS), "activation": "gelu"}  # what shapes cannot tell about the image tower


def open_clip_clip(seed: int = 0, text_width: int = TEXT_WIDTH) -> nn.Module:
    """A random-init open_clip CLIP whose every float tensor (LayerNorms included) is moved off its init value."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=EMBED,
        vision_cfg=CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=IMAGE),
        text_cfg=CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=text_width, heads=text_width // 64, layers=TEXT_DEPTH),
    )
    model.load_state_dict(perturbed(model.state_dict(), seed=seed + 100, scale=0.2))
    return model.eval()


def hf_clip_state(oc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPModel keys for an open_clip CLIP state dict."""
    hf = hf_state_from_open_clip({k[len("visual.") :]: v for k, v in oc.items() if k.startswith("visual.")})
    hf.update(
        {
            "text_model.embeddings.token_embedding.weight": oc["token_embedding.weight"],
            "text_model.embeddings.position_embedding.weight": oc["positional_embedding"],
            "text_model.embeddings.position_ids": torch.arange(CONTEXT).unsqueeze(0),
            "text_model.final_layer_norm.weight": oc["ln_final.weight"],
            "text_model.final_layer_norm.bias": oc["ln_final.bias"],
            "text_projection.weight": oc["text_projection"].t(),
            "logit_scale": oc["logit_scale"],
        }
    )
    for n in range(TEXT_DEPTH):
        hf.update(hf_block_state(oc, f"transformer.resblocks.{n}.", f"text_model.encoder.layers.{n}."))
    return {k: v.contiguous() for k, v in hf.items()}


def hf_clip_config() -> dict:
    text = {
        "model_type": "clip_text_model",
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 4 * TEXT_WIDTH,
        "num_attention_heads": TEXT_HEADS,
        "num_hidden_layers": TEXT_DEPTH,
        "max_position_embeddings": CONTEXT,
        "vocab_size": VOCAB,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": EMBED,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": EMBED, "text_config": text, "vision_config": hf_config()}


def write_clip(tmp: Path, seed: int = 0) -> tuple[nn.Module, Path, Path]:
    """(open_clip model, open_clip safetensors file, HF CLIPModel folder) holding the same weights."""
    model = open_clip_clip(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    oc_path = write(tmp / "clip" / "open_clip_model.safetensors", state, META)
    hf_dir = tmp / "hf_clip"
    write(hf_dir / "model.safetensors", hf_clip_state(state))
    (hf_dir / "config.json").write_text(json.dumps(hf_clip_config()))
    return model, oc_path, hf_dir


def clip_reference_head(model: nn.Module, classes: list[str], templates: list[str]) -> torch.Tensor:
    """open_clip's own computation (task_vectors' build_classification_head): encode_text, normalise, average, normalise, x logit scale."""
    import open_clip

    rows = []
    with torch.no_grad():
        for name in classes:
            emb = model.encode_text(open_clip.tokenize([t.replace("{}", name) for t in templates]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
    return model.logit_scale.exp() * torch.stack(rows)


def image_folder(root, classes, per_class=3, seed=0):
    """One folder of small random RGB images per class (sizes vary, as real folders do)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            side = int(rng.integers(28, 40))
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def visual_tasks(tmp, state, n):
    """Fine-tune-like image towers (open_clip layout, no text tower) of the CLIP's image tower."""
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    return [write(tmp / f"task{i}.safetensors", perturbed(visual, seed=20 + i), META) for i in range(n)]


def two_tasks_on_a_folder(tmp: Path) -> tuple[Path, list[Path], Path, dict[str, Path]]:
    """A base, two fine-tune-like tasks, one tiny two-class image folder both tasks read, and a random head per task."""
    base, tasks, _, _ = zoo(tmp, tasks=2)
    data = image_folder(tmp / "data", ["a", "b"], per_class=2)
    heads = {f"t{i}": write(tmp / "heads" / f"t{i}.safetensors", {"weight": torch.randn(2, 16)}) for i in range(2)}
    return base, tasks, data, heads
