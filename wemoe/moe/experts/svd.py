"""Rank-R factors of task vectors: the exact SVD, and a randomized one that is fast on large matrices.

The exact path (float64 ``torch.linalg.svd`` of every task vector, one at a time) is what
low-rank experts have always used; its cost grows as out * in * min(out, in) per matrix,
which dominates a ViT-L/14 merge. The randomized path (Halko, Martinsson and Tropp, 2011)
finds the top-R subspace from a sketch of R + oversampling random directions refined by a
few power iterations, in float32 and batched over the tasks of one layer: its cost is a
handful of (out x in) x (in x R') products. Task vectors' spectra decay slowly, so the
power iterations matter; the energy kept is measured exactly (against the true Frobenius
norm) either way, and recorded.
"""

from __future__ import annotations

import torch

SVD_METHODS = ("exact", "randomized")
SVD_HELP = (
    "how --expert-rank factors are found: exact (float64 SVD of each task vector) or randomized "
    "(float32 sketch with oversampling and power iterations, batched over a layer's tasks: much faster on large matrices)"
)
OVERSAMPLE = 16  # extra sketch directions beyond the rank
POWER_ITERATIONS = 3
SEED = 0  # the sketch is drawn from a fixed seed: the same inputs give the same factors


def truncated_svd(dw: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``down`` (R, in), ``up`` (R, out) with ``up^T @ down`` the best rank-R approximation of ``dw`` (out, in),
    and the fraction of ``dw``'s energy (squared Frobenius norm) they keep."""
    u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    total = float((s * s).sum())
    kept = float((s[:rank] * s[:rank]).sum())
    up = (u[:, :rank] * s[:rank]).t()
    return vh[:rank].to(dw.dtype).contiguous(), up.to(dw.dtype).contiguous(), (kept / total if total > 0 else 1.0)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


@torch.no_grad()
def randomized_truncated_svd(
    stack: torch.Tensor, rank: int, oversample: int = OVERSAMPLE, power_iterations: int = POWER_ITERATIONS, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Rank-R factors of each of T matrices (T, out, in) at once: ``down`` (T, R, in), ``up`` (T, R, out), and per
    matrix the fraction of its energy kept. Float32 throughout but for the small (R' x in) SVD."""
    a = stack.float()
    t, out_f, in_f = a.shape
    sketch = min(rank + oversample, out_f, in_f)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(in_f, sketch, generator=generator).to(a.device)
    q = _orthonormal(a @ omega)  # (T, out, R')
    for _ in range(power_iterations):
        q = _orthonormal(a @ _orthonormal(a.transpose(1, 2) @ q))
    b = q.transpose(1, 2) @ a  # (T, R', in): a's rows projected on the found range
    u_b, s, vh = torch.linalg.svd(b.double(), full_matrices=False)
    u = q.double() @ u_b[:, :, :rank]  # (T, out, R)
    s = s[:, :rank]
    up = (u * s[:, None, :]).transpose(1, 2)
    total = torch.linalg.vector_norm(a, dim=(1, 2), dtype=torch.float64).pow(2)  # no float64 copy of the stack
    kept = (s * s).sum(dim=1)
    fractions = [float(k / n) if n > 0 else 1.0 for k, n in zip(kept.tolist(), total.tolist())]
    return vh[:, :rank].float().contiguous(), up.float().contiguous(), [min(f, 1.0) for f in fractions]


__all__ = ["OVERSAMPLE", "POWER_ITERATIONS", "SVD_HELP", "SVD_METHODS", "randomized_truncated_svd", "truncated_svd"]
