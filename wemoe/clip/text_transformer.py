"""CLIP's text encoder, written against the canonical text layout (``wemoe.schemes.text``).

Its blocks are the image tower's :class:`~wemoe.model.vit.Block` with causal
attention, so one block implementation serves both towers and no library's
module internals are needed to read an open_clip or Hugging Face text tower.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from wemoe.core.arch import TextArch
from wemoe.model.vit import Block


class TextTransformer(nn.Module):
    """Token + position embedding, causal pre-norm blocks, final norm, the end-of-text token, projection."""

    def __init__(self, arch: TextArch):
        super().__init__()
        self.arch = arch
        self.token_embed = nn.Embedding(arch.vocab_size, arch.width)
        self.pos_embed = nn.Parameter(torch.zeros(arch.context_length, arch.width))
        self.blocks = nn.ModuleList(Block(arch, causal=True) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(arch.width, eps=arch.layer_norm_eps)
        self.proj = nn.Linear(arch.width, arch.embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context) token ids -> (B, E) text embedding, read where the end-of-text token (the largest id) sits."""
        x = self.token_embed(tokens) + self.pos_embed[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)])


def build_text_transformer(arch: TextArch, state_dict: Mapping[str, torch.Tensor]) -> TextTransformer:
    """The text encoder with canonical weights loaded, strict key matching."""
    model = TextTransformer(arch)
    model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()
