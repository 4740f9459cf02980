"""Sign-and-mask experts (``--expert-store sign-mask``): each task vector as bits and one scale.

In the spirit of T-Switch (Qi et al., 2024) and E-WEMoE's pruning: of each task vector
only its largest-magnitude entries are kept (``--expert-density``, a fraction), as a bit
mask over the matrix, the kept entries' signs (one bit each) and one float32 scale per
task: ``tau_t ~= scale_t * sign_t * mask_t``. The scale is the kept entries' mean
magnitude, which is the least-squares fit of that form. A task costs ``(1 + density) / 32``
of its float32 matrix in the file.

The per-sample merge reads dense tiles, so ``apply`` unpacks the bits to the dense stack
on every call (a pass over T x out x in numbers, small next to the merge itself, which
reads them once per sample); nothing unpacked is kept, so memory between calls is the
bits only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wemoe.core.params import param
from wemoe.errors import WemoeError
from wemoe.moe.experts.base import EXPERT_STORES, ExpertStore, ExpertStoreKind, TaskVectors
from wemoe.moe.experts.dense import per_sample_linear
from wemoe.moe.experts.rank import RANK_HELP, parse_rank

DENSITY_HELP = "--expert-store sign-mask: share of each task vector's entries kept (largest magnitudes), as signs under one scale"
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(T, n) booleans as (T, ceil(n / 8)) uint8, least significant bit first."""
    T, n = bits.shape
    padded = torch.zeros(T, -(-n // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:, :n] = bits
    return (padded.view(T, -1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (T, n) booleans."""
    weights = _BIT_WEIGHTS.to(packed.device)
    return (packed[..., None] & weights).ne(0).view(packed.shape[0], -1)[:, :n]


def kept_count(numel: int, density: float) -> int:
    """Entries kept of a matrix of ``numel``: at least one."""
    return max(1, min(numel, round(density * numel)))


def sign_mask(tau: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The ``keep`` largest-magnitude entries of one flattened task vector: their mask, their signs (in the
    mask's order) and the scale that fits them best (their mean magnitude)."""
    flat = tau.reshape(-1).float()
    top = flat.abs().topk(keep, sorted=False).indices.sort().values  # the mask's order is flat order
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[top] = True
    kept = flat[top]
    return mask, kept > 0, float(kept.abs().mean())


class SignMaskExperts(ExpertStore):
    """Task vectors as ``mask`` (T, ceil(out*in/8)) and ``sign`` (T, ceil(kept/8)) bits, ``scale`` (T,) and whole ``bias`` (T, out).

    The bits run over the matrix in the layout the dense kernels read (``(out, in)`` for an
    expanding layer, ``(in, out)`` for a contracting one), so unpacking needs no transpose.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, density: float, device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = int(num_experts), int(in_features), int(out_features)
        self.density = float(density)
        self.expanding = out_features >= in_features
        self.numel = in_features * out_features
        self.keep = kept_count(self.numel, self.density)
        self.register_buffer("mask", torch.empty(num_experts, -(-self.numel // 8), dtype=torch.uint8, device=device))
        self.register_buffer("sign", torch.empty(num_experts, -(-self.keep // 8), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(num_experts, device=device))
        self.register_buffer("bias", torch.empty(num_experts, out_features, device=device))

    def stack(self) -> torch.Tensor:
        """The dense (T, rows, cols) stack in the kernels' layout: ``scale * (+1 | -1)`` where kept, 0 elsewhere."""
        T = self.num_experts
        mask = unpack_bits(self.mask, self.numel)
        positive = unpack_bits(self.sign, self.keep)
        values = torch.where(positive, 1.0, -1.0).to(self.scale.dtype) * self.scale[:, None]
        dense = torch.zeros(T, self.numel, dtype=self.scale.dtype, device=self.scale.device)
        dense.masked_scatter_(mask, values)  # row-major: each task's kept entries in flat order, as packed
        shape = (self.out_features, self.in_features) if self.expanding else (self.in_features, self.out_features)
        return dense.view(T, *shape)

    def apply(self, x: torch.Tensor, coefs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return per_sample_linear(x, coefs, weight, bias, self.stack(), self.bias, self.expanding)

    def task_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        stack = self.stack()
        return (stack if self.expanding else stack.transpose(1, 2)), self.bias

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, sign-mask density={self.density:g}"


@EXPERT_STORES.register
class SignMask(ExpertStoreKind):
    name = "sign-mask"
    summary = "each task vector's largest entries as signs under one scale, with a bit mask (T-Switch, E-WEMoE)"

    @dataclass(frozen=True)
    class Options:
        rank: str = param("full", RANK_HELP, key="expert_rank", check=parse_rank)
        density: float = param(0.1, DENSITY_HELP, key="expert_density", low=0.0, high=1.0, low_open=True)

    def check(self, arch) -> None:
        if parse_rank(self.options.rank) is not None:
            raise WemoeError(f"--expert-store sign-mask keeps whole matrices as bits: --expert-rank must be full, got {self.options.rank}")

    def build(self, num_experts: int, in_features: int, out_features: int, device: torch.device | str | None = None) -> ExpertStore:
        return SignMaskExperts(num_experts, in_features, out_features, self.options.density, device=device)

    def weight_buffers(self, vectors: TaskVectors, out_features: int, in_features: int) -> tuple[dict[str, torch.Tensor], Any]:
        """One task at a time (the float stack is never built): its mask, signs and scale; the record keeps
        each task's share of squared norm the kept form explains (1 - relative squared error)."""
        expanding = out_features >= in_features
        keep = kept_count(out_features * in_features, self.options.density)
        masks, signs, scales, explained = [], [], [], []
        for tau in vectors:
            matrix = tau.float() if expanding else tau.float().t()
            mask, positive, scale = sign_mask(matrix, keep)
            masks.append(mask)
            signs.append(positive)
            scales.append(scale)
            norm = float(matrix.pow(2).sum())
            # ||tau - s * sign * mask||^2 = ||tau||^2 - keep * s^2 for the least-squares s
            explained.append(round(keep * scale * scale / norm, 6) if norm > 0 else 1.0)
        buffers = {"mask": pack_bits(torch.stack(masks)), "sign": pack_bits(torch.stack(signs)), "scale": torch.tensor(scales, dtype=torch.float32)}
        return buffers, explained

    def describe(self) -> str:
        return f"sign-mask, density {self.options.density:g}"

    def record(self) -> dict[str, Any]:
        return {"rank": None, "expert_store": {"kind": self.name, "options": {"density": self.options.density}}}


__all__ = ["SignMask", "SignMaskExperts", "pack_bits", "sign_mask", "unpack_bits"]
