"""A tiny transformers CLIP image tower, shared by the tests that save transformers folders."""

from __future__ import annotations

WIDTH, DEPTH, HEADS, PATCH, IMAGE, EMBED = 32, 2, 2, 8, 32, 16


def vision_config():
    import transformers

    return transformers.CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_attention_heads=HEADS,
        num_hidden_layers=DEPTH,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=EMBED,
        hidden_act="quick_gelu",
    )
