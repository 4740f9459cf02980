"""Dense experts (the paper's WEMoE): every task vector kept whole, merged per sample by the tiled kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wemoe.core.params import param
from wemoe.errors import WemoeError
from wemoe.moe.experts.base import EXPERT_STORES, ExpertStore, ExpertStoreKind, TaskVectors, work_dtype
from wemoe.moe.experts.rank import RANK_HELP, parse_rank
from wemoe.moe.kernels import DEFAULT_CHUNK_SIZE, DEFAULT_TILE_ROWS, contract_linear, expand_linear


def per_sample_linear(
    x: torch.Tensor,
    coefs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stack: torch.Tensor,
    stack_bias: torch.Tensor,
    expanding: bool,
    chunk_size: int | None = None,
    tile_rows: int | None = None,
) -> torch.Tensor:
    """``x_b @ (W0 + sum_t c_bt dW_t)^T + b0 + sum_t c_bt db_t`` by the tiled kernels, from a whole stack in their
    layout: (T, out, in) for an ``expanding`` layer, (T, in, out) otherwise; a layer without bias passes None."""
    xc = x.to(stack.dtype).contiguous()
    if bias is None:
        bias = stack_bias.new_zeros(stack_bias.shape[-1])
    rows = stack.shape[1]
    chunk = max(1, min(chunk_size or DEFAULT_CHUNK_SIZE, x.shape[0]))
    tile = max(1, min(tile_rows or DEFAULT_TILE_ROWS, rows))
    if expanding:
        return expand_linear(xc, coefs, weight, stack, bias, stack_bias, chunk, tile)
    return contract_linear(xc, coefs, weight.t().contiguous(), stack, bias, stack_bias, chunk, tile)


class DenseExperts(ExpertStore):
    """Whole task vectors, merged per sample by the tiled kernels (``wemoe.moe.kernels``).

    The stack is tiled along the layer's longer side, so it is stored in the layout
    the kernel reads contiguously: ``weight`` (T, out, in) when out >= in (an
    expanding layer: fc1, qkv, square ones), else ``weight_t`` (T, in, out) (a
    contracting layer: fc2). ``chunk_size`` (samples per merged tile) and
    ``tile_rows`` change speed only, never results beyond float rounding.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = int(num_experts), int(in_features), int(out_features)
        self.expanding = out_features >= in_features
        shape = (num_experts, out_features, in_features) if self.expanding else (num_experts, in_features, out_features)
        self.register_buffer("weight" if self.expanding else "weight_t", torch.empty(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(num_experts, out_features, dtype=dtype, device=device))
        self.chunk_size: int | None = None
        self.tile_rows: int | None = None

    @property
    def stack(self) -> torch.Tensor:
        """The expert stack in its stored layout."""
        return self.weight if self.expanding else self.weight_t

    def apply(self, x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return per_sample_linear(x, coefs, weight, bias, self.stack, self.bias, self.expanding, self.chunk_size, self.tile_rows)

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.weight if self.expanding else self.weight_t.transpose(1, 2)), self.bias

    @torch.no_grad()
    def delta(self, coefs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # merged in the stored layout (one matmul over a contiguous stack), then viewed as (out, in)
        work = work_dtype(self.stack.dtype)
        c = coefs.to(device=self.stack.device, dtype=work).reshape(-1)
        flat = (c @ self.stack.reshape(self.num_experts, -1).to(work)).view(self.stack.shape[1:])
        return (flat if self.expanding else flat.t()), c @ self.bias.to(work)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, dense"


@EXPERT_STORES.register
class Dense(ExpertStoreKind):
    name = "dense"
    summary = "every task vector whole (the paper's WEMoE)"

    @dataclass(frozen=True)
    class Options:
        rank: str = param("full", RANK_HELP, key="expert_rank", check=parse_rank)

    def check(self, arch) -> None:
        if parse_rank(self.options.rank) is not None:
            raise WemoeError(f"--expert-store dense keeps whole task vectors: --expert-rank must be full, got {self.options.rank}")

    def build(self, num_experts: int, in_features: int, out_features: int, device: torch.device | str | None = None) -> ExpertStore:
        return DenseExperts(num_experts, in_features, out_features, device=device)

    def weight_buffers(self, vectors: TaskVectors, out_features: int, in_features: int) -> tuple[dict[str, torch.Tensor], Any]:
        if out_features >= in_features:
            return {"weight": vectors.stack().float()}, None
        # contracting layers keep the stack transposed: build it that way, saving a copy
        return {"weight_t": vectors.stack(transposed=True).transpose(1, 2).float()}, None

    def record(self) -> dict[str, Any]:
        return {"rank": None}


__all__ = ["Dense", "DenseExperts", "per_sample_linear"]
