"""``--expert-store sign-mask``: each task vector as its largest entries' signs under one scale, with a bit mask;
checked against a numpy reconstruction, the per-sample reference forward, the file's size and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import wemoe
from wemoe.checkpoints.checkpoint import open_checkpoint
from wemoe.moe.experts import EXPERT_STORES
from wemoe.moe.experts.sign_mask import SignMask, pack_bits, unpack_bits
from wemoe.moe.reference import reference_forward

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from factories import zoo

T = 3


def reference_sign_mask(tau: np.ndarray, density: float) -> np.ndarray:
    """The kept form of one task vector, computed independently: top entries by magnitude, their signs, mean magnitude."""
    flat = tau.astype(np.float64).ravel()
    keep = max(1, round(density * flat.size))
    top = np.argsort(-np.abs(flat), kind="stable")[:keep]
    out = np.zeros_like(flat)
    out[top] = np.sign(flat[top]) * np.abs(flat[top]).mean()
    return out.reshape(tau.shape)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_bits_pack_to_an_eighth_and_back(n):
    bits = torch.rand(3, n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-n // 8))
    assert torch.equal(unpack_bits(packed, n), bits)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])  # an expanding and a contracting layer
def test_store_holds_the_reference_sign_mask_of_each_task_vector(shape):
    gen = torch.Generator().manual_seed(3)
    taus = [torch.randn(*shape, generator=gen) * (t + 1) for t in range(T)]
    kind = SignMask(SignMask.Options(density=0.25))
    buffers, explained = kind.weight_buffers(taus, *shape)
    store = kind.build(T, shape[1], shape[0])
    store.load_state_dict({**buffers, "bias": torch.zeros(T, shape[0])})
    weights, _ = store.task_vectors()
    for t, tau in enumerate(taus):
        want = reference_sign_mask(tau.numpy(), 0.25)
        assert np.allclose(weights[t].numpy(), want, atol=1e-6)
        residual = ((tau.double().numpy() - want) ** 2).sum() / (tau.double() ** 2).sum().item()
        assert explained[t] == pytest.approx(1 - residual, abs=1e-5)
    # the file holds (1 + density) bits per entry: mask over every entry, a sign per kept one
    assert buffers["mask"].numel() == T * shape[0] * shape[1] // 8 and buffers["sign"].numel() == T * -(-(shape[0] * shape[1] // 4) // 8)
    x, coefs = torch.randn(4, 5, shape[1], generator=gen), torch.rand(4, T, generator=gen)
    w0, b0 = torch.randn(*shape, generator=gen), torch.randn(shape[0], generator=gen)
    got = store.apply(x, coefs, w0, b0)
    merged = w0[None] + torch.einsum("bt,toi->boi", coefs, weights)
    assert torch.allclose(got, torch.einsum("bni,boi->bno", x, merged) + b0, atol=1e-5)


def test_density_one_keeps_every_entry_as_its_sign():
    tau = torch.tensor([[0.5, -1.5], [2.0, -1.0]])
    buffers, explained = SignMask(SignMask.Options(density=1.0)).weight_buffers([tau], 2, 2)
    assert unpack_bits(buffers["mask"], 4).all() and buffers["scale"].item() == pytest.approx(1.25)
    assert explained[0] == pytest.approx(4 * 1.25**2 / 7.5, abs=1e-6)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sign-mask")
    base, tasks, _, _ = zoo(tmp, tasks=T)
    return tmp, base, tasks


def _merge(capsys, merged, name, *extra):
    tmp, base, tasks = merged
    out = tmp / name
    if not out.exists():
        code, _, err = merge_cli(capsys, base, tasks, "wemoe", out, "--experts", "mlp,attn", "--steps", 0, *extra)
        assert code == 0, err
    return out


def test_merged_model_keeps_the_sign_mask_and_matches_the_reference_forward(merged, capsys):
    out = _merge(capsys, merged, "sm", "--expert-store", "sign-mask", "--expert-density", "0.2")
    record = json.loads((out / "config.json").read_text())["wemoe"]
    assert record["expert_store"] == {"kind": "sign-mask", "options": {"density": 0.2}} and record["rank"] is None
    model = wemoe.load(out)
    _, base, tasks = merged
    key = "blocks.1.mlp.fc1.weight"
    b, ft = open_checkpoint(base).state_dict()[key], open_checkpoint(tasks[1]).state_dict()[key]
    want = reference_sign_mask((ft - b).numpy(), 0.2)
    assert np.allclose(model.blocks[1].mlp.fc1.experts.task_vectors()[0][1].numpy(), want, atol=1e-6)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(x), reference_forward(model, x), atol=1e-5)


def test_sign_mask_file_is_smaller_than_dense_by_the_bits(merged, capsys):
    dense = _merge(capsys, merged, "dense")
    sm = _merge(capsys, merged, "sm", "--expert-store", "sign-mask", "--expert-density", "0.2")
    expert_bytes = lambda out: sum(
        t.numel() * t.element_size() for n, t in wemoe.load(out).state_dict().items() if ".experts." in n and not n.endswith(".bias")
    )
    # float32 numbers against (1 + 0.2) bits each plus a scale per task and layer: about 1.2 / 32 of them
    assert expert_bytes(sm) / expert_bytes(dense) == pytest.approx(1.2 / 32, rel=0.05)


def test_sign_mask_refusals(merged, capsys):
    tmp, base, tasks = merged
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--expert-store", "sign-mask", "--expert-rank", 4, "--steps", 0)
    assert_one_line_error(code, err, "--expert-rank must be full")
    code, _, err = run_cli(capsys, "merge", "--base", base, "--tasks", f"t0={tasks[0]}", "--method", "wemoe", "--out", tmp / "never", "--expert-density", "0")
    assert_one_line_error(code, err, "--expert-density")
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--expert-density", "0.5", "--steps", 0)
    assert_one_line_error(code, err, "--expert-density")
    assert not (tmp / "never").exists()
    assert "sign-mask" in EXPERT_STORES.names()
