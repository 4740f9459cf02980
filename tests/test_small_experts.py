"""``--small-experts compressed``: with ``--experts all``, the patch embedding's and the projection's task vectors
kept by the blocks' expert store (rank-R factors, int8 if asked) instead of whole; checked against a truncated SVD
computed here, the per-sample reference forward, and the whole-vector merge."""

import json

import numpy as np
import pytest
import torch

import wemoe
from wemoe.checkpoints.checkpoint import open_checkpoint
from wemoe.data import load_data, preprocess
from wemoe.io.safetensors_io import load_tensors

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from factories import EMBED, PATCH, WIDTH, tinted_tasks

T, RANK = 3, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    base, tasks, heads, data = tinted_tasks(tmp, tasks=T, images=40, train=30, seed=5)
    return tmp, base, tasks, heads, data


def merged(setup, capsys, name: str, *extra) -> object:
    tmp, base, tasks, heads, data = setup
    out = tmp / name
    if not out.exists():
        args = ["--experts", "all", "--router", "task", "--router-images", 30, "--steps", 0, "--split", "train", *extra]
        code, _, err = merge_cli(capsys, base, tasks, "wemoe", out, *args, heads=heads, data=data)
        assert code == 0, err
    return out


def truncated(tau: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a matrix, in float64 (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_compressed_small_experts_are_the_truncated_svd_of_each_task_vector(setup, capsys):
    tmp, base, tasks, _, _ = setup
    out = merged(setup, capsys, "compressed", "--expert-rank", RANK, "--small-experts", "compressed")
    record = json.loads((out / "config.json").read_text())["wemoe"]
    assert record["small_experts"] == "compressed" and record["rank"] == RANK
    state, _ = load_tensors(out / "model.safetensors")
    assert state["patch_embed.proj.experts.down"].shape == (T, RANK, 3 * PATCH * PATCH)
    assert state["head.experts.up"].shape == (T, RANK, EMBED)
    assert "patch_embed.proj.experts.weight" not in state and "head.experts.weight" not in state
    assert torch.equal(state["patch_embed.proj.experts.bias"], torch.zeros(T, WIDTH))  # open_clip's stem has no bias
    model = wemoe.load(out)
    b = open_checkpoint(base).state_dict()
    for t, path in enumerate(tasks):
        ft = open_checkpoint(path).state_dict()
        onehot = torch.eye(T)[t]
        for module, key in ((model.patch_embed.proj, "patch_embed.proj.weight"), (model.head, "head.weight")):
            tau = (ft[key] - b[key]).reshape(b[key].shape[0], -1)
            want = b[key].double() + truncated(tau, RANK).view(b[key].shape)
            assert torch.allclose(module.merged(onehot)["weight"].double(), want, atol=1e-5), key


def test_compressed_small_experts_forward_equals_the_per_sample_reference(setup, capsys):
    from wemoe.moe.reference import reference_forward

    _, _, _, _, data = setup
    cases = (
        ("compressed", ("--expert-rank", RANK)),
        ("compressed-int8", ("--expert-rank", RANK, "--expert-dtype", "int8")),
        ("compressed-sign-mask", ("--expert-store", "sign-mask", "--expert-density", "0.3")),
    )
    for name, extra in cases:
        out = merged(setup, capsys, name, "--small-experts", "compressed", *extra)
        model = wemoe.load(out)
        images = preprocess(np.concatenate([load_data(data[f"t{t}"], "test").arrays[:2] for t in range(T)]), model.arch)
        with torch.no_grad():
            assert torch.allclose(model(images), reference_forward(model, images), atol=1e-5), name


def test_int8_small_experts_stay_near_the_float32_ones(setup, capsys):
    exact = wemoe.load(merged(setup, capsys, "compressed", "--expert-rank", RANK, "--small-experts", "compressed"))
    int8 = wemoe.load(merged(setup, capsys, "compressed-int8", "--expert-rank", RANK, "--small-experts", "compressed", "--expert-dtype", "int8"))
    assert int8.patch_embed.proj.experts.down_q.dtype == torch.int8
    c = torch.tensor([0.2, 0.5, 0.3])
    for name in ("patch_embed.proj", "head"):
        a, q = exact.get_submodule(name).merged(c)["weight"], int8.get_submodule(name).merged(c)["weight"]
        base = exact.get_submodule(name).weight
        assert (q - a).norm() < 0.02 * (a - base).norm(), name  # int8 rows: relative error ~1/254 per row


def test_compressed_small_experts_make_the_file_smaller(setup, capsys):
    whole = merged(setup, capsys, "whole", "--expert-rank", RANK)
    small = merged(setup, capsys, "compressed", "--expert-rank", RANK, "--small-experts", "compressed")
    assert "small_experts" not in json.loads((whole / "config.json").read_text())["wemoe"]  # the default record is unchanged
    # whole: (T, W, 3pp) and (T, E, W) task vectors; compressed: their rank-R factors plus zero expert biases (T, W) and (T, E)
    saved = T * (WIDTH * 3 * PATCH * PATCH + EMBED * WIDTH - RANK * (3 * PATCH * PATCH + WIDTH) - RANK * (WIDTH + EMBED) - WIDTH - EMBED) * 4
    size = lambda out: (out / "model.safetensors").stat().st_size
    assert abs((size(whole) - size(small)) - saved) < 4096  # the difference is the matrices' numbers (headers aside)


def test_small_experts_refusals(setup, capsys):
    tmp, base, tasks, heads, data = setup
    common = ["--router", "task", "--router-images", 30, "--steps", 0, "--split", "train"]
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", *common, "--small-experts", "compressed", "--expert-rank", 4, heads=heads, data=data)
    assert_one_line_error(code, err, "--small-experts compressed applies to", "add --experts all")
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", *common, "--experts", "all", "--small-experts", "compressed", heads=heads, data=data)
    assert_one_line_error(code, err, "give --expert-rank R")
    code, _, err = merge_cli(
        capsys, base, tasks, "wemoe", tmp / "never", *common, "--experts", "all", "--small-experts", "compressed", "--expert-rank", 32, heads=heads, data=data
    )
    assert_one_line_error(code, err, "--expert-rank 32 is above the projection's smaller side (16)")
    code, _, err = run_cli(capsys, "merge", "--base", base, "--tasks", f"t0={tasks[0]}", "--method", "wemoe", "--out", tmp / "never", "--small-experts", "half")
    assert_one_line_error(code, err, "--small-experts must be one of whole, compressed")
    assert not (tmp / "never").exists()
