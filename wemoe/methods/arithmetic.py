"""The classic static merges, one tensor at a time.

Each function gets the base tensor and the task vectors tau_i = theta_i - theta_0
of ONE tensor, so the engine can stream a model tensor by tensor. The task
vectors arrive as an iterable: average and task arithmetic sum them as they
come (one task's tensor in memory at a time); TIES needs all of them at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _sum_and_count(base: torch.Tensor, taus: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    total = torch.zeros_like(base)
    n = 0
    for tau in taus:
        total.add_(tau)
        n += 1
    return total, n


def average(base: torch.Tensor, taus: Iterable[torch.Tensor]) -> torch.Tensor:
    """Simple weight averaging: mean_i theta_i = theta_0 + mean_i tau_i."""
    total, n = _sum_and_count(base, taus)
    return total.div_(max(n, 1)).add_(base)


def task_arithmetic(base: torch.Tensor, taus: Iterable[torch.Tensor], lam: float) -> torch.Tensor:
    """theta_0 + lambda * sum_i tau_i (Ilharco et al., 2023)."""
    total, _ = _sum_and_count(base, taus)
    return total.mul_(lam).add_(base)


def ties_trim(tau: torch.Tensor, k_percent: float) -> torch.Tensor:
    """Keep the k% largest-magnitude entries of one task vector tensor, zero the rest."""
    n = tau.numel()
    keep = int(round(n * k_percent / 100.0))
    if keep >= n:
        return tau.clone()
    if keep <= 0:
        return torch.zeros_like(tau)
    flat = tau.reshape(-1)
    idx = flat.abs().topk(keep, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(tau)


def ties(base: torch.Tensor, taus: Iterable[torch.Tensor], lam: float, k_percent: float) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023): trim, elect sign by summed mass, disjoint mean.

    Trimming is per tensor (as mergekit does) so the merge can stream; the
    paper's per-model threshold would need every task vector in memory at once.
    """
    trimmed = torch.stack([ties_trim(t, k_percent) for t in taus])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign.unsqueeze(0)) & (trimmed != 0)
    count = agree.sum(0).clamp(min=1)
    disjoint_mean = (trimmed * agree).sum(0) / count
    return base + lam * disjoint_mean
