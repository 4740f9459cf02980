"""The MoE block: a transformer block whose routed groups mix the task vectors per sample.

A group is a sub-layer whose linears are routed together: ``mlp`` (fc1, fc2; the
paper's WEMoE) and ``attn`` (the fused qkv projection and the output
projection). The block owns one router per group; each router reads the input
of its own sub-layer (the MLP's: the hidden state after the second LayerNorm;
attention's: after the first), averaged over tokens, and gives one coefficient
vector per sample (B, T). The same coefficients scale every linear of the group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from wemoe.core.arch import ViTArch
from wemoe.errors import WemoeError
from wemoe.model.vit import Block, LayerNorm, Linear
from wemoe.moe.experts import ExpertStoreKind
from wemoe.moe.rest import RoutedLayerNorm
from wemoe.moe.routed import RoutedLinear, routed_linear_factory

GROUPS = ("attn", "mlp")  # the order of a block's routing entries
# How a block keeps routing coefficients inside ``coef_range``. Both give the same forward (the clamped
# value); they differ in the gradient past a bound: "clamp" passes none (a router pushed past a bound for
# every sample stops learning), "straight-through" passes the gradient of the unclamped value, so the
# router keeps learning and can come back.
# "clamp" stays the default so the paper's default run is unchanged; "straight-through" is opt-in
# (0.3 points above clamp on the zoo's paper row, benchmarks/results/accuracy.md).
COEF_GUARDS = ("clamp", "straight-through")
DEFAULT_COEF_GUARD = "clamp"
GROUP_LINEARS = {"attn": ("qkv", "proj"), "mlp": ("fc1", "fc2")}


class MoEBlock(Block):
    def __init__(
        self,
        arch: ViTArch,
        num_experts: int,
        groups: Sequence[str],
        store: ExpertStoreKind,
        routers: dict[str, nn.Module],
        coef_range: tuple[float, float] | None = None,
        coef_guard: str = DEFAULT_COEF_GUARD,
        device: torch.device | str | None = None,
        routed_norms: bool = False,
    ):
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise WemoeError(f"unknown expert group(s) {sorted(unknown)} (known: {', '.join(GROUPS)})")
        routed = routed_linear_factory(num_experts, store, device)
        norm = (lambda width, eps: RoutedLayerNorm(width, num_experts, eps)) if routed_norms else LayerNorm
        super().__init__(arch, attn_linear=routed if "attn" in groups else Linear, mlp_linear=routed if "mlp" in groups else Linear, norm=norm)
        self.groups = tuple(g for g in GROUPS if g in groups)
        # one router per group; none when a router computed once per image gives every block its coefficients
        self.routers = nn.ModuleDict({g: routers[g] for g in self.groups if g in routers})
        if coef_guard not in COEF_GUARDS:
            raise WemoeError(f"unknown coefficient guard '{coef_guard}' (known: {', '.join(COEF_GUARDS)})")
        self.coef_range = coef_range
        self.coef_guard = coef_guard

    def coefficients(self, group: str, h: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor | None:
        if group not in self.groups:
            return None
        if given is not None:  # fixed routing, or a router computed once per image
            return given.to(dtype=h.dtype, device=h.device)
        r = self.routers[group](h)
        if self.coef_range is not None:
            clamped = r.clamp(self.coef_range[0], self.coef_range[1])
            r = clamped if self.coef_guard == "clamp" else r + (clamped - r).detach()
        return r

    def sublayer(self, group: str) -> nn.Module:
        return self.attn if group == "attn" else self.mlp

    def routed_linears(self, group: str) -> dict[str, RoutedLinear]:
        """The routed linears of ``group`` by their name in the sub-layer (qkv/proj, fc1/fc2)."""
        layer = self.sublayer(group)
        return {name: getattr(layer, name) for name in GROUP_LINEARS[group]}


__all__ = ["COEF_GUARDS", "DEFAULT_COEF_GUARD", "GROUPS", "GROUP_LINEARS", "MoEBlock"]
