"""Key schemes of CLIP text towers: open_clip and Hugging Face ``CLIPModel``, in one canonical layout.

Canonical text layout (the image tower's block names, so one block serves both)::

    token_embed.weight   [vocab, D]
    pos_embed            [context, D]
    blocks.N.*           norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2 (as the image tower)
    norm.weight/bias     the final LayerNorm
    proj.weight          [E, D] (open_clip stores its transpose, ``text_projection`` [D, E])

The logit scale sits outside the text tower in both libraries (open_clip's
``logit_scale`` beside ``text_projection``, or one level up for towers nested
under ``text.``); :func:`logit_scale_key` finds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from wemoe.errors import WemoeError
from wemoe.schemes.rules import SAME, TRANSPOSE, Rule, Scheme, SchemeMatch, hf_block_rules, open_clip_block_rules

TEXT_REQUIRED = ("token_embed.weight", "pos_embed", "norm.weight", "norm.bias", "proj.weight")

OPEN_CLIP_TEXT = Scheme(
    name="open_clip",
    anchor="token_embedding.weight",
    confirm="ln_final.weight",
    block_regex=r"transformer\.resblocks\.(\d+)\.",
    roots=("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection"),
    rules=tuple(
        [
            Rule("token_embed.weight", ("token_embedding.weight",)),
            Rule("pos_embed", ("positional_embedding",)),
            Rule("norm.weight", ("ln_final.weight",)),
            Rule("norm.bias", ("ln_final.bias",)),
            Rule("proj.weight", ("text_projection",), TRANSPOSE),
        ]
        + open_clip_block_rules()
    ),
)

HF_CLIP_TEXT = Scheme(
    name="hf_clip",
    anchor="text_model.embeddings.token_embedding.weight",
    confirm="text_model.final_layer_norm.weight",
    block_regex=r"text_model\.encoder\.layers\.(\d+)\.",
    roots=("text_model.", "text_projection."),
    rules=tuple(
        [
            Rule("token_embed.weight", ("text_model.embeddings.token_embedding.weight",)),
            Rule("pos_embed", ("text_model.embeddings.position_embedding.weight",)),
            Rule("norm.weight", ("text_model.final_layer_norm.weight",)),
            Rule("norm.bias", ("text_model.final_layer_norm.bias",)),
            Rule("proj.weight", ("text_projection.weight",), SAME),
        ]
        + hf_block_rules("text_model")
    ),
)

TEXT_SCHEMES = (HF_CLIP_TEXT, OPEN_CLIP_TEXT)  # HF first: its keys end like open_clip's anchor


def detect_text_scheme(keys: Sequence[str], path: str | None = None) -> SchemeMatch:
    """The text tower of a full CLIP checkpoint, or a one-line refusal naming what is missing."""
    for scheme in TEXT_SCHEMES:
        prefix = scheme.find_prefix(keys)
        if prefix is not None:
            return scheme.match(keys, prefix, path)
    raise WemoeError(
        "no CLIP text tower in this checkpoint (expected open_clip's 'token_embedding.weight' or Hugging Face's 'text_model.*'); "
        "zero-shot heads need the full CLIP model, not an image tower (task_vectors' zeroshot.pt keeps the image tower only)",
        path=path,
    )


def logit_scale_key(keys: Sequence[str], prefix: str) -> str | None:
    """``logit_scale`` beside the text tower, or in an enclosing module (open_clip's ``text.`` towers)."""
    keyset = set(keys)
    parts = prefix.split(".")[:-1] if prefix else []
    for depth in range(len(parts), -1, -1):
        candidate = ".".join(parts[:depth] + ["logit_scale"])
        if candidate in keyset:
            return candidate
    return None
