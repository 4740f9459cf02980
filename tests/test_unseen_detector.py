"""The unseen-image detector's score against the Mahalanobis distance computed with an explicit covariance inverse."""

from __future__ import annotations

import torch

from wemoe.moe.unseen import SHRINK, UnseenDetector


def reference_scores(features: torch.Tensor, owner: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Per task: covariance = (1 - SHRINK) * (top-k eigenpairs + the mean remaining eigenvalue on the rest) +
    SHRINK * the mean variance, all in standardised coordinates; the smallest distance over tasks."""
    x = features.double()
    mean, std = x.mean(0), x.std(0) + 1e-3
    z = (x - mean) / std
    q = (queries.double() - mean) / std
    f = z.shape[1]
    out = []
    for t in range(int(owner.max()) + 1):
        rows = z[owner == t]
        c = rows - rows.mean(0)
        cov = c.T @ c / len(c)
        lam, vec = torch.linalg.eigh(cov)
        lam, vec = lam.flip(0), vec.flip(1)
        rest = lam[k:].sum() / (f - k)
        model = (vec[:, :k] * lam[:k]) @ vec[:, :k].T + rest * (torch.eye(f, dtype=z.dtype) - vec[:, :k] @ vec[:, :k].T)
        cov_t = (1 - SHRINK) * model + SHRINK * lam.sum() / f * torch.eye(f, dtype=z.dtype)
        d = q - rows.mean(0)
        out.append(torch.einsum("bf,fg,bg->b", d, torch.linalg.inv(cov_t), d))
    return torch.stack(out, 1).min(1).values


def test_score_equals_the_explicit_mahalanobis_distance():
    g = torch.Generator().manual_seed(0)
    f, k = 12, 3
    centres = torch.randn(3, f, generator=g) * 4
    mixing = torch.randn(3, f, f, generator=g) * torch.logspace(0, -1.5, f)  # anisotropic, task-specific shapes
    owner = torch.arange(3).repeat_interleave(80)
    feats = centres[owner] + torch.einsum("nf,nfg->ng", torch.randn(240, f, generator=g), mixing[owner])
    detector = UnseenDetector(f, 3, components=k).double()
    detector.fit(feats, owner)
    queries = torch.cat([feats[::17], torch.randn(5, f, generator=g) * 10])
    got = detector.score(queries)
    want = reference_scores(feats, owner, queries, k)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-8)


def test_far_images_score_higher_than_the_tasks_own():
    g = torch.Generator().manual_seed(1)
    owner = torch.arange(2).repeat_interleave(100)
    feats = torch.randn(200, 16, generator=g) + owner[:, None] * 5.0
    detector = UnseenDetector(16, 2, components=4)
    detector.fit(feats, owner)
    own = detector.score(feats)
    far = detector.score(torch.randn(50, 16, generator=g) + 30.0)
    assert far.min() > own.max()
