"""The merged WEMoE model: a ViT whose chosen blocks' MLPs are weight-ensembling
MoE blocks, plus the task heads it was merged for.

Everything that is not a MoE MLP holds task-arithmetic weights
theta_0 + lambda * sum_i tau_i; each MoE MLP holds the pretrained MLP, the MLP
task vectors (frozen) and its router (the only trainable part).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn as nn

from wemoe.arch import ViTArch
from wemoe.errors import WemoeError
from wemoe.heads import Head
from wemoe.model.moe import WeightEnsemblingMLP
from wemoe.model.vit import VisionTransformer


def parse_moe_blocks(spec: str | Sequence[int] | None, depth: int) -> list[int]:
    """``all`` | ``last:N`` | ``first:N`` | ``0,3,5`` -> sorted block indices."""
    if spec is None or spec == "all":
        return list(range(depth))
    if not isinstance(spec, str):
        blocks = sorted(set(int(b) for b in spec))
    else:
        s = spec.strip()
        try:
            if s.startswith("last:"):
                n = int(s[5:])
                blocks = list(range(max(0, depth - n), depth)) if n > 0 else []
            elif s.startswith("first:"):
                n = int(s[6:])
                blocks = list(range(min(n, depth))) if n > 0 else []
            else:
                blocks = sorted(set(int(p) for p in s.split(",") if p.strip()))
        except ValueError:
            raise WemoeError(f"invalid --moe-blocks '{spec}' (use all, last:N, first:N or 0,3,5)") from None
    if not blocks:
        raise WemoeError(f"--moe-blocks '{spec}' selects no block")
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise WemoeError(f"--moe-blocks names block(s) {bad}; the model has blocks 0..{depth - 1}")
    return blocks


class WEMoEModel(VisionTransformer):
    """``model(images)`` -> image embedding; ``model.logits(images, task)``; ``model.routing(images)``."""

    def __init__(
        self,
        arch: ViTArch,
        task_names: Sequence[str],
        moe_blocks: Sequence[int],
        router_layers: int = 2,
        init_lambda: float = 0.3,
        coef_range: tuple[float, float] | None = None,
        head_bias: bool = False,
    ):
        super().__init__(arch, head_bias=head_bias)
        self.task_names = list(task_names)
        self.moe_blocks = list(moe_blocks)
        self.heads: dict[str, Head] = {}
        T, D, H = len(task_names), arch.width, arch.mlp_width
        with torch.device("meta"):
            for b in self.moe_blocks:
                self.blocks[b].mlp = WeightEnsemblingMLP(
                    torch.empty(H, D), torch.empty(H), torch.empty(D, H), torch.empty(D),
                    torch.empty(T, H, D), torch.empty(T, H), torch.empty(T, D, H), torch.empty(T, D),
                    activation=arch.activation, router_layers=router_layers, init_lambda=init_lambda, coef_range=coef_range,
                )

    def moe_modules(self) -> list[WeightEnsemblingMLP]:
        return [self.blocks[b].mlp for b in self.moe_blocks]  # type: ignore[misc]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.moe_modules() for p in m.router.parameters()]

    def freeze_backbone(self) -> "WEMoEModel":
        """Only routers train in WEMoE: everything else is frozen."""
        router = {id(p) for p in self.router_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in router)
        return self

    def logits(self, images: torch.Tensor, task: str) -> torch.Tensor:
        if task not in self.heads:
            raise WemoeError(f"unknown task '{task}' (this model has heads for: {', '.join(self.heads) or 'none'})")
        return self.heads[task].logits(self(images))

    def routing(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Routing weights, one (B, T) tensor per MoE block in block order, experts in task order."""
        out: list[torch.Tensor] = []
        x = self.tokens(images)
        for i, block in enumerate(self.blocks):
            x = x + block.attn(block.norm1(x))
            h = block.norm2(x)
            if i in self.moe_blocks:
                r = block.mlp.routing_weights(h)
                out.append(r)
                x = x + block.mlp(h, routing=r)
            else:
                x = x + block.mlp(h)
        return out

    @contextmanager
    def fixed_routing(self, coefs: Sequence[float] | torch.Tensor) -> Iterator["WEMoEModel"]:
        """Route every sample with the same (T,) coefficients while inside the block.

        A diagnostic, not a way to deploy: e.g. one-hot on a task's own expert gives
        the accuracy a perfect router could reach with the merged non-MLP weights.
        """
        c = torch.as_tensor(coefs, dtype=torch.float32).reshape(-1)
        if c.numel() != len(self.task_names):
            raise WemoeError(f"fixed routing needs {len(self.task_names)} coefficients, got {c.numel()}")
        modules = self.moe_modules()
        for m in modules:
            m.fixed_routing = c.to(m.fc1_weight.device)
        try:
            yield self
        finally:
            for m in modules:
                m.fixed_routing = None

    def set_coef_range(self, coef_range: tuple[float, float] | None) -> None:
        for m in self.moe_modules():
            m.coef_range = coef_range
