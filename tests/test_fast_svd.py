"""Randomized truncated SVD of task vectors (``--expert-svd randomized``) against the exact float64 SVD."""

from __future__ import annotations

import json

import pytest
import torch

import wemoe
from wemoe.moe.experts import randomized_truncated_svd, truncated_svd
from wemoe.moe.experts.svd import SVD_METHODS

from cli_helpers import assert_one_line_error, merge_cli
from factories import zoo


def matrices_with_spectrum(t: int, out_f: int, in_f: int, decay: float, seed: int) -> torch.Tensor:
    """T random (out, in) matrices whose singular values fall as 1 / (1 + i)^decay (fine-tuning's task vectors decay
    slowly: a decay near 0.5-1)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    s = 1.0 / (1.0 + torch.arange(k, dtype=torch.float64)) ** decay
    mats = []
    for _ in range(t):
        u = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64)).Q
        mats.append((u * s) @ v.T)
    return torch.stack(mats).float()


def best_rank(a: torch.Tensor, rank: int) -> torch.Tensor:
    down, up, _ = truncated_svd(a, rank)
    return up.double().T @ down.double()


@pytest.mark.parametrize("decay", [0.5, 1.0, 2.0])
def test_randomized_factors_match_the_exact_truncation(decay):
    a = matrices_with_spectrum(3, 192, 96, decay, seed=1)
    down, up, kept = randomized_truncated_svd(a, 8)
    assert down.shape == (3, 8, 96) and up.shape == (3, 8, 192) and down.dtype == torch.float32
    for t in range(3):
        exact_kept = truncated_svd(a[t], 8)[2]
        got = up[t].double().T @ down[t].double()
        best = best_rank(a[t], 8)
        err, optimal = (a[t].double() - got).norm(), (a[t].double() - best).norm()
        assert err <= optimal * 1.01  # within 1% of the best rank-8 error
        assert abs(kept[t] - exact_kept) < 2e-3 * exact_kept
        # the energy recorded is the energy the factors really keep
        assert abs(kept[t] - got.pow(2).sum().item() / a[t].double().pow(2).sum().item()) < 1e-4


def test_randomized_on_a_flat_spectrum_is_near_optimal_and_deterministic():
    a = torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(3))  # no decay at all: the hard case
    down, up, kept = randomized_truncated_svd(a, 16)
    again = randomized_truncated_svd(a, 16)
    assert torch.equal(down, again[0]) and torch.equal(up, again[1])
    for t in range(2):
        exact = truncated_svd(a[t], 16)[2]
        assert exact * 0.97 <= kept[t] <= exact + 1e-6


def test_rank_at_the_matrix_size_is_exact():
    a = matrices_with_spectrum(2, 40, 24, 1.0, seed=4)
    down, up, kept = randomized_truncated_svd(a, 24)
    assert torch.allclose(up.transpose(1, 2) @ down, a, atol=1e-5)
    assert all(abs(k - 1.0) < 1e-5 for k in kept)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svd")
    base, tasks, _, _ = zoo(tmp, tasks=3)
    return tmp, base, tasks


def test_merge_with_randomized_svd_records_it_and_keeps_the_energy(checkpoints, capsys):
    tmp, base, tasks = checkpoints
    common = ("--experts", "mlp,attn", "--expert-rank", "8")
    assert merge_cli(capsys, base, tasks, "wemoe", tmp / "exact", *common)[0] == 0
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "fast", *common, "--expert-svd", "randomized")
    assert code == 0, err
    exact, fast = (json.loads((tmp / n / "config.json").read_text()) for n in ("exact", "fast"))
    assert fast["parameters"]["expert_svd"] == "randomized" and exact["parameters"]["expert_svd"] == "exact"
    assert fast["wemoe"]["energy_kept"].keys() == exact["wemoe"]["energy_kept"].keys()
    for layer, kept in exact["wemoe"]["energy_kept"].items():
        assert all(0.97 * e <= f <= e + 1e-5 for e, f in zip(kept, fast["wemoe"]["energy_kept"][layer])), layer
    a, b = wemoe.load(tmp / "exact"), wemoe.load(tmp / "fast")
    dw_exact, _ = a.blocks[1].mlp.fc1.experts.task_vectors()
    dw_fast, _ = b.blocks[1].mlp.fc1.experts.task_vectors()
    assert (dw_fast - dw_exact).norm() < 0.3 * dw_exact.norm()  # flat random spectra: subspaces differ a little
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert ((a(x) - b(x)).abs().max() / a(x).abs().max()).item() < 0.05


def test_unknown_svd_method_is_a_one_line_error(checkpoints, capsys):
    tmp, base, tasks = checkpoints
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "bad", "--expert-rank", "4", "--expert-svd", "fast")
    assert_one_line_error(code, err, "--expert-svd", *SVD_METHODS)
    assert not (tmp / "bad").exists()
