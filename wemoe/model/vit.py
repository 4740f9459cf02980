"""The image encoder, written once against the canonical (timm) layout.

One forward for every checkpoint wemoe reads (timm, open_clip, HF CLIP), so a
merged model behaves identically whatever layout it came from. The encoder is
assembled from factories, timm-style: ``block_fn`` makes each block, and a block
makes its attention and MLP linears with a ``linear`` factory. A plain ViT uses
:class:`Linear`; a WEMoE block passes a factory of routed linears
(``wemoe.moe.routed``) for the sub-layers it routes. Every linear takes the
routing coefficients of its group as a second argument (plain ones ignore it), so
the block loop below is the only one, for plain and mixture models alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from wemoe.core.arch import TextArch, ViTArch
from wemoe.errors import WemoeError
from wemoe.model.activations import get_activation
from wemoe.model.heads import Head

LinearFactory = Callable[[int, int], nn.Module]  # (in_features, out_features) -> module(x, coefs)
NormFactory = Callable[..., nn.Module]  # (width, eps=...) -> module(x, coefs)


class Linear(nn.Linear):
    """``nn.Linear`` that accepts (and ignores) routing coefficients."""

    def forward(self, x: torch.Tensor, coefs: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str, linear: LinearFactory = Linear):
        super().__init__()
        self.fc1 = linear(width, hidden)
        self.fc2 = linear(hidden, width)
        self.activation = activation
        self._act = get_activation(activation)

    def forward(self, x: torch.Tensor, coefs: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self._act(self.fc1(x, coefs)), coefs)


class Attention(nn.Module):
    """Multi-head self-attention; ``causal`` lets each token see only earlier ones (CLIP's text tower)."""

    def __init__(self, width: int, heads: int, linear: LinearFactory = Linear, causal: bool = False):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = linear(width, 3 * width)
        self.proj = linear(width, width)

    def forward(self, x: torch.Tensor, coefs: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x, coefs).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d), coefs)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that accepts (and ignores) routing coefficients."""

    def forward(self, x: torch.Tensor, coefs: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class RoutingTrace:
    """What a forward pass routed: the (B, T) coefficients of every routed group, in routing order, and
    (when ``keep_inputs``) the token-mean of each group's router input, (B, D).

    ``given`` (B, T): coefficients known before the pass (a router computed once per image, or
    fixed routing) that every routed part uses instead of asking its block's routers.
    """

    def __init__(self, keep_inputs: bool = False, given: torch.Tensor | None = None):
        self.routes: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] | None = [] if keep_inputs else None
        self.given = given
        self.posterior: torch.Tensor | None = None  # (B, T) a shared router's task posterior
        self.unseen: torch.Tensor | None = None  # (B,) bool: images it served as belonging to no merged task

    def record(self, h: torch.Tensor, coefs: torch.Tensor) -> None:
        self.routes.append(coefs)
        if self.inputs is not None:
            self.inputs.append(h.mean(dim=1))


class Block(nn.Module):
    """Pre-norm transformer block. A ``trace`` collects routing; plain blocks add nothing to it."""

    def __init__(
        self,
        arch: ViTArch | TextArch,
        attn_linear: LinearFactory = Linear,
        mlp_linear: LinearFactory = Linear,
        causal: bool = False,
        norm: NormFactory = LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm(arch.width, eps=arch.layer_norm_eps)
        self.attn = Attention(arch.width, arch.heads, attn_linear, causal)
        self.norm2 = norm(arch.width, eps=arch.layer_norm_eps)
        self.mlp = Mlp(arch.width, arch.mlp_width, arch.activation, mlp_linear)

    def coefficients(self, group: str, h: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor | None:
        """Routing coefficients of ``group`` ("attn" or "mlp") for its input ``h`` (or from ``given``); None when not routed."""
        return None

    def forward(self, x: torch.Tensor, trace: RoutingTrace | None = None) -> torch.Tensor:
        given = trace.given if trace is not None else None
        for group, norm, layer in (("attn", self.norm1, self.attn), ("mlp", self.norm2, self.mlp)):
            if given is None:  # the block's routers read the sub-layer's input
                h = norm(x)
                c = self.coefficients(group, h)
            else:  # known before the sub-layer: its norm can be routed too
                c = self.coefficients(group, x, given)
                h = norm(x, c)
            if trace is not None and c is not None:
                trace.record(h, c)
            x = x + layer(h, c)
        return x


BlockFactory = Callable[[ViTArch, int], Block]


class PatchEmbed(nn.Module):
    def __init__(self, arch: ViTArch):
        super().__init__()
        self.proj = nn.Conv2d(3, arch.width, arch.patch_size, arch.patch_size, bias=arch.patch_bias)


class VisionTransformer(nn.Module):
    """CLIP-style ViT: patchify, prepend CLS, (pre-norm), blocks, norm, CLS, projection."""

    def __init__(self, arch: ViTArch, head_bias: bool = False, block_fn: BlockFactory = lambda arch, _i: Block(arch)):
        super().__init__()
        self.arch = arch
        self.patch_embed = PatchEmbed(arch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_tokens, arch.width))
        self.norm_pre = nn.LayerNorm(arch.width, eps=arch.layer_norm_eps) if arch.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(block_fn(arch, i) for i in range(arch.depth))
        self.norm = nn.LayerNorm(arch.width, eps=arch.layer_norm_eps)
        self.head = nn.Linear(arch.width, arch.embed_dim, bias=head_bias) if arch.embed_dim is not None else nn.Identity()
        self.task_names: list[str] = []  # the tasks a merge was made for (experts' order in WEMoE)
        self.heads: dict[str, Head] = {}  # task classification heads on the image embedding

    def tokens(self, images: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with the class token and positions; ``given``: coefficients of routed embeddings (none here)."""
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.norm_pre(x + self.pos_embed.to(x.dtype))

    def embedding(self, cls: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        """The image embedding from the last class token: final norm and projection."""
        return self.head(self.norm(cls))

    def encode(self, images: torch.Tensor, trace: RoutingTrace | None = None) -> torch.Tensor:
        """Image embedding; what every routed group routed is recorded in ``trace``."""
        given = trace.given if trace is not None else None
        x = self.tokens(images, given)
        for block in self.blocks:
            x = block(x, trace)
        return self.embedding(x[:, 0], given)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)

    def logits(self, images: torch.Tensor, task: str) -> torch.Tensor:
        """Class logits of ``task`` with its stored head."""
        if not self.heads:
            raise WemoeError(f"this model has no heads, so no logits for task '{task}': merge with --heads, or apply your own head to model(images)")
        if task not in self.heads:
            raise WemoeError(f"unknown task '{task}' (this model has heads for: {', '.join(self.heads)})")
        return self.heads[task].logits(self(images))


def build_vit(arch: ViTArch, state_dict: Mapping[str, torch.Tensor]) -> VisionTransformer:
    """Build the encoder and load canonical weights with strict key matching."""
    model = VisionTransformer(arch, head_bias="head.bias" in state_dict)
    model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()
