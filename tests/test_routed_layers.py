"""Routed layers end to end (dense / low-rank x mlp / attn / both): the merged model equals a per-sample
reference, samples are independent, untrained routers give task arithmetic, export equals the routing it
bakes in, a fresh process reloads it exactly, and bad options are one-line refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import wemoe
from wemoe.checkpoints.checkpoint import open_checkpoint
from wemoe.model.vit import build_vit
from wemoe.moe.reference import reference_forward

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from factories import zoo
from test_adamerging import heads_and_data

T = 3
KINDS = [("mlp", "full"), ("attn", "full"), ("mlp,attn", "full"), ("mlp", "4"), ("attn", "4"), ("mlp,attn", "4")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routed")
    base, tasks, base_state, states = zoo(tmp, tasks=T)
    heads, data = heads_and_data(tmp, T)
    return tmp, base, [f"t{i}={p}" for i, p in enumerate(tasks)], heads, data, base_state, states


def merge(capsys, setup, out, *extra):
    tmp, base, tasks, heads, data, _, _ = setup
    return merge_cli(capsys, base, tasks, "wemoe", tmp / out, *extra, heads=heads)


def adapted(capsys, setup, experts, rank):
    tmp, *_, heads, data, _, _ = setup
    name = f"m-{experts.replace(',', '+')}-{rank}"
    if not (tmp / name).exists():
        code, _, err = merge(
            capsys,
            setup,
            name,
            "--experts",
            experts,
            "--expert-rank",
            rank,
            "--data",
            *[f"{k}={v}" for k, v in data.items()],
            "--steps",
            "3",
            "--lr",
            "5e-2",
            "--batch-size",
            "6",
            "--coef-range",
            "none",
        )
        assert code == 0, err
    return tmp / name


@pytest.mark.parametrize("experts,rank", KINDS)
def test_model_equals_per_sample_reference_and_is_batch_independent(setup, capsys, experts, rank):
    model = wemoe.load(adapted(capsys, setup, experts, rank))
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x)
        ref = reference_forward(model, x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(5)])
        routes = model.routing(x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert torch.allclose(got, alone, rtol=1e-5, atol=1e-6)
    assert len(routes) == len(experts.split(",")) * 2 and all(r.shape == (5, T) for r in routes)
    assert max((r.max(0).values - r.min(0).values).max().item() for r in routes) > 1e-4  # routing depends on the image


@pytest.mark.parametrize("experts", ["attn", "mlp,attn"])
def test_low_rank_experts_are_the_truncated_svd_of_the_task_vectors(setup, capsys, experts):
    _, _, _, _, _, base_state, states = setup
    model = wemoe.load(adapted(capsys, setup, experts, "4"))
    layer = model.blocks[1].attn.qkv
    dw, db = layer.experts.task_vectors()
    for t, state in enumerate(states):
        tau = state["visual.transformer.resblocks.1.attn.in_proj_weight"] - base_state["visual.transformer.resblocks.1.attn.in_proj_weight"]
        u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        assert torch.allclose(dw[t].double(), best, atol=1e-5)
        bias = state["visual.transformer.resblocks.1.attn.in_proj_bias"] - base_state["visual.transformer.resblocks.1.attn.in_proj_bias"]
        assert torch.allclose(db[t], bias, atol=1e-6)  # biases stay dense
    cfg = json.loads((adapted(capsys, setup, experts, "4") / "config.json").read_text())
    energy = cfg["wemoe"]["energy_kept"]["blocks.1.attn.qkv"]
    assert len(energy) == T and all(0 < e < 1 for e in energy)
    assert cfg["wemoe"]["rank"] == 4 and cfg["parameters"]["expert_rank"] == "4"


def test_low_rank_at_full_rank_equals_dense(setup, capsys):
    common = ("--experts", "mlp,attn", "--moe-blocks", "last:1")
    assert merge(capsys, setup, "full-dense", *common)[0] == 0
    assert merge(capsys, setup, "full-lowrank", *common, "--expert-rank", "64")[0] == 0  # 64 = the width: nothing dropped
    tmp = setup[0]
    a, b = wemoe.load(tmp / "full-dense"), wemoe.load(tmp / "full-lowrank")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert ((a(x) - b(x)).abs().max() / a(x).abs().max()).item() < 1e-5


@pytest.mark.parametrize("experts", ["attn", "mlp,attn"])
def test_untrained_routers_equal_task_arithmetic(setup, capsys, experts):
    tmp, base, tasks, *_ = setup
    assert merge(capsys, setup, f"ta-{experts}", "--experts", experts, "--lambda", "0.35")[0] == 0
    assert run_cli(capsys, "merge", "--base", base, "--tasks", *tasks, "--lambda", "0.35", "--out", tmp / f"ta-ref-{experts}", "-q")[0] == 0
    model = wemoe.load(tmp / f"ta-{experts}")
    with torch.no_grad():
        for router in model.routers():
            router.hidden.weight.zero_()
            router.out.weight.zero_()
    ck = open_checkpoint(tmp / f"ta-ref-{experts}")
    ta = build_vit(ck.arch, ck.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ta(x), rtol=1e-5, atol=1e-6)


def _forward_with_group_coefficients(model, x, coefs: dict):
    """The WEMoE forward with every sample of group (block, group) routed by coefs[(block, group)]."""
    originals = {}
    for b in model.moe_blocks:
        block = model.blocks[b]
        originals[b] = block.coefficients
        block.coefficients = lambda g, h, b=b: coefs[(b, g)].expand(h.shape[0], -1) if (b, g) in coefs else None
    try:
        return model(x)
    finally:
        for b, fn in originals.items():
            model.blocks[b].coefficients = fn


@pytest.mark.parametrize("experts,rank", [("mlp,attn", "full"), ("mlp,attn", "4"), ("attn", "full")])
def test_export_equals_the_routing_it_bakes_in(setup, capsys, experts, rank):
    tmp, _, _, _, data, _, _ = setup
    src = adapted(capsys, setup, experts, rank)
    out = tmp / f"export-{experts}-{rank}"
    code, _, err = run_cli(capsys, "export", src, "--task", "t1", "--out", out, "-q")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    mean = torch.tensor(cfg["parameters"]["mean_routing"], dtype=torch.float32)
    model = wemoe.load(src)
    assert cfg["parameters"]["routing_order"] == model.route_labels() and mean.shape == (len(model.route_labels()), T)
    ck = open_checkpoint(out)
    plain = build_vit(ck.arch, ck.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = _forward_with_group_coefficients(model, x, dict(zip(model.spec.routes(), mean)))
        assert torch.allclose(plain(x), want, rtol=1e-5, atol=1e-5)
    assert wemoe.load(out).heads.keys() == {"t1"}


@pytest.mark.parametrize("experts,rank", [("mlp,attn", "4"), ("attn", "full")])
def test_fresh_process_reload_is_exact_and_bfloat16_works(setup, capsys, experts, rank):
    tmp = setup[0]
    src = adapted(capsys, setup, experts, rank)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    torch.save(x, tmp / "x.pt")
    script = (
        f"import torch, wemoe\nm = wemoe.load({str(src)!r})\nx = torch.load({str(tmp / 'x.pt')!r})\n"
        f"with torch.no_grad():\n    torch.save({{'f': m(x), 'r': m.routing(x)}}, {str(tmp / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    y = torch.load(tmp / "y.pt")
    m = wemoe.load(src)
    with torch.no_grad():
        assert torch.equal(m(x), y["f"]) and all(torch.equal(a, b) for a, b in zip(m.routing(x), y["r"]))
    code, _, err = merge(capsys, setup, f"bf16-{experts}-{rank}", "--experts", experts, "--expert-rank", rank, "--dtype", "bfloat16")
    assert code == 0, err
    b = wemoe.load(tmp / f"bf16-{experts}-{rank}")
    with torch.no_grad():
        assert b(x).dtype == torch.float32 and torch.isfinite(b(x)).all()


def test_routes_report_every_group(setup, capsys):
    tmp, _, _, _, data, _, _ = setup
    src = adapted(capsys, setup, "mlp,attn", "4")
    code, stdout, err = run_cli(capsys, "routes", src, "--task", *[f"{k}={v}" for k, v in data.items()], "--json", tmp / "routes.json", "-q")
    assert code == 0, err
    rep = json.loads((tmp / "routes.json").read_text())
    assert rep["routes"] == ["0.attn", "0.mlp", "1.attn", "1.mlp"] and np.array(rep["mean_routing"]["t0"]).shape == (4, T)
    assert "1.attn" in stdout


def test_routed_layer_refusals(setup, capsys):
    tmp, base, tasks, *_ = setup
    code, _, err = merge(capsys, setup, "r1", "--expert-rank", "0")
    assert_one_line_error(code, err, "--expert-rank must be at least 1")
    code, _, err = merge(capsys, setup, "r2", "--expert-rank", "65")
    assert_one_line_error(code, err, "--expert-rank 65 is above the smaller side (64)")
    code, _, err = merge(capsys, setup, "r3", "--expert-rank", "lots")
    assert_one_line_error(code, err, "--expert-rank must be 'full' or a positive integer")
    code, _, err = merge(capsys, setup, "r4", "--experts", "mlp,ffn")
    assert_one_line_error(code, err, "--experts must be all, or name one or more of attn, mlp")
    code, _, err = run_cli(capsys, "merge", "--base", base, "--tasks", *tasks, "--method", "task-arithmetic", "--expert-rank", "4", "--out", tmp / "r5", "-q")
    assert_one_line_error(code, err, "--expert-rank only applies to --method wemoe")
    assert code == 2
    assert not any((tmp / f"r{i}").exists() for i in range(1, 6))
