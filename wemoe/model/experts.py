"""Expert stores: the task vectors of one linear layer, and how they are applied per sample.

A store holds, for T tasks, the change fine-tuning made to one linear layer
(dW_t, db_t) and answers three questions behind one small interface:

* ``apply(x, coefs, weight, bias)``: ``x_b @ (W0 + sum_t c_bt dW_t)^T + b0 + sum_t c_bt db_t``
  for every sample b, given the layer's pretrained ``weight``/``bias``;
* ``delta(coefs)``: ``sum_t c_t dW_t`` and ``sum_t c_t db_t`` for one fixed coefficient vector
  (export, fixed routing);
* its buffers (the state that is saved).

``DenseExperts`` keep every task vector whole (the paper's WEMoE) and merge per
sample with the tiled kernels. ``LowRankExperts`` keep each weight task vector as
its rank-R truncated SVD, ``dW_t ~= up_t^T @ down_t`` (biases stay dense), and never
form per-sample weights: ``y = x W0^T + b0 + sum_t c_t ((x down_t^T) up_t + db_t)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wemoe.errors import WemoeError
from wemoe.model.kernels import DEFAULT_CHUNK_SIZE, DEFAULT_TILE_ROWS, contract_linear, expand_linear


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ExpertStore(nn.Module):
    num_experts: int
    in_features: int
    out_features: int

    def apply(self, x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, out, in) weight and (T, out) bias task vectors as this store represents them."""
        raise NotImplementedError

    @torch.no_grad()
    def delta(self, coefs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_t c_t dW_t`` (out, in) and ``sum_t c_t db_t`` (out,), merged in float32 or better."""
        dw, db = self.task_vectors()
        work = _work_dtype(dw.dtype)
        c = coefs.to(device=dw.device, dtype=work).reshape(-1)
        return (c @ dw.reshape(self.num_experts, -1).to(work)).view(self.out_features, self.in_features), c @ db.to(work)


class DenseExperts(ExpertStore):
    """Whole task vectors, merged per sample by the tiled kernels (``wemoe.model.kernels``).

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

    def _sizes(self, batch: int) -> tuple[int, int]:
        rows = self.out_features if self.expanding else self.in_features
        chunk = self.chunk_size or DEFAULT_CHUNK_SIZE
        tile = self.tile_rows or DEFAULT_TILE_ROWS
        return max(1, min(chunk, batch)), max(1, min(tile, rows))

    def apply(self, x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        dtype = self.stack.dtype
        xc = x.to(dtype).contiguous()
        chunk, tile = self._sizes(x.shape[0])
        if self.expanding:
            return expand_linear(xc, coefs, weight, self.weight, bias, self.bias, chunk, tile)
        return contract_linear(xc, coefs, weight.t().contiguous(), self.weight_t, bias, self.bias, chunk, tile)

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.weight if self.expanding else self.weight_t.transpose(1, 2)), self.bias

    @torch.no_grad()
    def delta(self, coefs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # merged in the stored layout (one matmul over a contiguous stack), then viewed as (out, in)
        work = _work_dtype(self.stack.dtype)
        c = coefs.to(device=self.stack.device, dtype=work).reshape(-1)
        flat = (c @ self.stack.reshape(self.num_experts, -1).to(work)).view(self.stack.shape[1:])
        return (flat if self.expanding else flat.t()), c @ self.bias.to(work)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, dense"


class LowRankExperts(ExpertStore):
    """Rank-R task vectors: ``dW_t ~= up_t^T @ down_t`` with ``down`` (T, R, in), ``up`` (T, R, out).

    ``down_t`` are the top-R right singular vectors of dW_t, ``up_t`` the left ones
    scaled by the singular values; ``bias`` (T, out) is kept whole.
    """

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, rank: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise WemoeError(f"expert rank must be between 1 and {min(in_features, out_features)} for a {out_features}x{in_features} matrix, got {rank}")
        self.num_experts, self.in_features, self.out_features, self.rank = int(num_experts), int(in_features), int(out_features), int(rank)
        self.register_buffer("down", torch.empty(num_experts, rank, in_features, dtype=dtype, device=device))
        self.register_buffer("up", torch.empty(num_experts, rank, out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(num_experts, out_features, dtype=dtype, device=device))

    def apply(self, x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        dtype = self.down.dtype
        xc = x.to(dtype)
        c = coefs.to(dtype)
        B, N = x.shape[:2]
        T, R = self.num_experts, self.rank
        h = F.linear(xc, self.down.reshape(T * R, self.in_features)).view(B, N, T, R) * c[:, None, :, None]
        # the expert biases ride along as T more columns (each token carries its sample's coefficients), so the
        # whole correction is one addmm into the base output: no (B, N, out) temporaries, one pass over y
        h = torch.cat([h.reshape(B * N, T * R), c.repeat_interleave(N, dim=0)], dim=1)  # (B*N, T*R + T)
        up = torch.cat([self.up.reshape(T * R, self.out_features), self.bias], dim=0)  # (T*R + T, out)
        y = F.linear(xc, weight, bias)
        return y.view(B * N, self.out_features).addmm_(h, up).view(B, N, self.out_features)

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.bmm(self.up.transpose(1, 2), self.down), self.bias

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, rank={self.rank}"


def truncated_svd(dw: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``down`` (R, in), ``up`` (R, out) with ``up^T @ down`` the best rank-R approximation of ``dw`` (out, in),
    and the fraction of ``dw``'s energy (squared Frobenius norm) they keep."""
    u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    total = float((s * s).sum())
    kept = float((s[:rank] * s[:rank]).sum())
    up = (u[:, :rank] * s[:rank]).t()
    return vh[:rank].to(dw.dtype).contiguous(), up.to(dw.dtype).contiguous(), (kept / total if total > 0 else 1.0)


__all__ = ["DenseExperts", "ExpertStore", "LowRankExperts", "truncated_svd"]
