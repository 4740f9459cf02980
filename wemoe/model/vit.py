"""The image encoder, written once against the canonical (timm) layout.

One forward for every checkpoint wemoe reads (timm, open_clip, HF CLIP) so a
merged model behaves identically whatever layout it came from, and so a block's
MLP can be swapped for the weight-ensembling MoE block.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from wemoe.arch import ViTArch
from wemoe.model.activations import get_activation


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.activation = activation
        self._act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self._act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, arch: ViTArch):
        super().__init__()
        self.norm1 = nn.LayerNorm(arch.width, eps=arch.layer_norm_eps)
        self.attn = Attention(arch.width, arch.heads)
        self.norm2 = nn.LayerNorm(arch.width, eps=arch.layer_norm_eps)
        self.mlp: nn.Module = Mlp(arch.width, arch.mlp_width, arch.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, arch: ViTArch):
        super().__init__()
        self.proj = nn.Conv2d(3, arch.width, arch.patch_size, arch.patch_size, bias=arch.patch_bias)


class VisionTransformer(nn.Module):
    """CLIP-style ViT: patchify, prepend CLS, (pre-norm), blocks, norm, CLS, projection."""

    def __init__(self, arch: ViTArch, head_bias: bool = False):
        super().__init__()
        self.arch = arch
        self.patch_embed = PatchEmbed(arch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_tokens, arch.width))
        self.norm_pre = nn.LayerNorm(arch.width, eps=arch.layer_norm_eps) if arch.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(arch.width, eps=arch.layer_norm_eps)
        self.head = nn.Linear(arch.width, arch.embed_dim, bias=head_bias) if arch.embed_dim is not None else nn.Identity()

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.norm_pre(x + self.pos_embed.to(x.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def build_vit(arch: ViTArch, state_dict: Mapping[str, torch.Tensor]) -> VisionTransformer:
    """Build the encoder and load canonical weights with strict key matching."""
    model = VisionTransformer(arch, head_bias="head.bias" in state_dict)
    model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()
