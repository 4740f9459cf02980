"""``subspace`` routers (SMILE, Tang et al. 2024): softmax of the norm of the tokens' projection onto
the top right singular vectors of each task vector of the group's first linear (fc1 for the MLP,
qkv for attention: the layer that reads the group input), averaged over tokens. No data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wemoe.core.params import param
from wemoe.errors import WemoeError
from wemoe.moe.block import GROUP_LINEARS
from wemoe.moe.experts import ExpertStore, LowRankExperts
from wemoe.moe.routers.base import ROUTERS, RouterCheck, RouterKind, keep_top_k
from wemoe.moe.routers.prototype import TEMPERATURE_HELP, TOP_K_HELP

DEFAULT_TEMPERATURE = 1.0


class SubspaceRouter(nn.Module):
    """SMILE routing: softmax_t(mean_n ||G_t h_n|| / temperature), top-k; ``gates`` (T, k, D) are
    the top-k right singular vectors of each task vector of the group's first linear."""

    def __init__(self, width: int, num_experts: int, gate_rank: int = 16, temperature: float = 1.0, top_k: int = 0):
        super().__init__()
        self.width, self.num_experts, self.gate_rank = int(width), int(num_experts), int(gate_rank)
        self.temperature, self.top_k = float(temperature), int(top_k)
        self.gates = nn.Parameter(torch.zeros(num_experts, gate_rank, width))

    def materialize(self, device: torch.device | str = "cpu") -> None:
        self.to_empty(device=device)
        with torch.no_grad():
            self.gates.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, k = self.num_experts, self.gate_rank
        proj = F.linear(x.to(self.gates.dtype), self.gates.reshape(T * k, self.width))  # (B, N, T*k)
        norms = proj.unflatten(-1, (T, k)).norm(dim=-1).mean(dim=1)  # (B, T)
        return keep_top_k(torch.softmax(norms / self.temperature, dim=-1), self.top_k)

    def extra_repr(self) -> str:
        return f"width={self.width}, num_experts={self.num_experts}, gate_rank={self.gate_rank}, temperature={self.temperature}, top_k={self.top_k}"


def gate_vectors(experts: ExpertStore, k: int) -> torch.Tensor:
    """(T, k, in): the top-k right singular vectors of each task vector of a linear layer."""
    if isinstance(experts, LowRankExperts) and experts.rank >= k:
        return experts.down[:, :k].float()  # the truncated SVD already holds them, in order
    dw, _ = experts.task_vectors()  # k fits: the kind's check compared it with the routed matrices first
    return torch.stack([torch.linalg.svd(t.double(), full_matrices=False)[2][:k] for t in dw]).float()


@ROUTERS.register
class Subspace(RouterKind):
    name = "subspace"
    summary = "SMILE's gate: norm of the input's projection on each task vector's top singular vectors (training-free, no data)"
    fitted = True

    @dataclass(frozen=True)
    class Options:
        temperature: float = param(0.0, TEMPERATURE_HELP, key="router_temperature", low=0.0)
        top_k: int = param(0, TOP_K_HELP, key="router_top_k", low=0)
        gate_rank: int = param(16, "subspace routers: right singular vectors per task vector", low=1)

    def check(self, ctx: RouterCheck) -> None:
        smallest = min(ctx.arch.width, ctx.arch.mlp_width)
        if self.options.gate_rank > smallest:
            raise WemoeError(f"--gate-rank {self.options.gate_rank} is above the smaller side ({smallest}) of the routed matrices")

    def build(self, width: int, num_experts: int, init_lambda: float) -> nn.Module:
        return SubspaceRouter(width, num_experts, self.options.gate_rank, self.options.temperature or DEFAULT_TEMPERATURE, self.options.top_k)

    def fit(self, model: Any, data: Mapping[str, Any], seed: int, device: str) -> None:
        for (b, group), router in zip(model.spec.routes(), model.routers()):
            first = model.blocks[b].routed_linears(group)[GROUP_LINEARS[group][0]]
            with torch.no_grad():
                router.gates.copy_(gate_vectors(first.experts, router.gate_rank))

    def record(self) -> dict:
        return {"temperature": self.options.temperature or None, "top_k": self.options.top_k, "gate_rank": self.options.gate_rank}


__all__ = ["Subspace", "SubspaceRouter", "gate_vectors"]
