"""WEMoE end to end on tiny models: equivalence to task arithmetic, per-sample
routing, router-only gradients, standalone save/load, routes and export."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from wemoe.io.safetensors_io import save_tensors

from cli_helpers import assert_one_line_error, run_cli
from factories import open_clip_vit, zoo

T = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wemoe")
    base, tasks, base_state, states = zoo(tmp, tasks=T)
    rng = np.random.default_rng(0)
    heads, data = [], []
    for i in range(T):
        save_tensors(tmp / f"h{i}.safetensors", {"weight": torch.randn(5, 16, generator=torch.Generator().manual_seed(i))}, {"normalize": "true"})
        np.savez(tmp / f"d{i}.npz", x=rng.integers(0, 255, (48, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 5, 48))
        heads.append(f"t{i}={tmp}/h{i}.safetensors")
        data.append(f"t{i}={tmp}/d{i}.npz")
    task_args = [f"t{i}={p}" for i, p in enumerate(tasks)]
    return tmp, base, task_args, heads, data


@pytest.fixture(scope="module")
def adapted(setup):
    """A WEMoE merge adapted for 3 steps (seed 7): made once, whichever test asks first."""
    from wemoe.cli import main

    tmp, base, task_args, heads, data = setup
    out = tmp / "adapted"
    args = ["merge", "--base", base, "--tasks", *task_args, "--method", "wemoe", "--out", out, "-q", "--heads", *heads, "--data", *data]
    try:
        main([str(a) for a in [*args, "--steps", "3", "--lr", "1e-2", "--seed", "7"]])
    except SystemExit as exc:
        assert not exc.code, f"merge failed with exit {exc.code}"
    return out


def merge(capsys, setup, out, *extra):
    tmp, base, task_args, heads, data = setup
    return run_cli(capsys, "merge", "--base", base, "--tasks", *task_args, "--method", "wemoe", "--out", tmp / out, "-q", *extra)


def untrained_and_task_arithmetic(setup, capsys, name: str, lam: str = "0.35"):
    """An untrained WEMoE merge and the task-arithmetic merge at the same lambda, both loaded."""
    import wemoe
    from wemoe.checkpoints.checkpoint import open_checkpoint
    from wemoe.model.vit import build_vit

    tmp, base, task_args, heads, data = setup
    code, _, err = merge(capsys, setup, name, "--lambda", lam, "--heads", *heads)
    assert code == 0, err
    code, _, err = run_cli(capsys, "merge", "--base", base, "--tasks", *task_args, "--lambda", lam, "--out", tmp / f"{name}-ta", "-q")
    assert code == 0, err
    ck = open_checkpoint(tmp / f"{name}-ta")
    return wemoe.load(tmp / name), build_vit(ck.arch, ck.state_dict())


def test_zeroed_routers_equal_task_arithmetic(setup, capsys):
    model, ta = untrained_and_task_arithmetic(setup, capsys, "untrained")
    with torch.no_grad():
        for router in model.routers():
            for name, p in router.named_parameters():
                p.zero_()
                if name.endswith("bias") and p.shape[-1] == T:
                    p.fill_(0.35)
            assert router(torch.randn(2, 5, 64)).allclose(torch.full((2, T), 0.35))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ta(x), rtol=1e-5, atol=1e-6)


def test_fixed_routing_overrides_the_router_and_is_restored(setup, capsys):
    from wemoe.errors import WemoeError

    model, ta = untrained_and_task_arithmetic(setup, capsys, "fixed")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        routed = model(x)
        with model.fixed_routing([0.35] * T):  # every expert at lambda: the task-arithmetic model
            assert torch.allclose(model(x), ta(x), rtol=1e-5, atol=1e-6)
            assert all(torch.equal(r, torch.full((4, T), 0.35)) for r in model.routing(x))  # reported as used
        assert torch.equal(model(x), routed)  # the router is back
    with pytest.raises(WemoeError, match=f"needs {T} coefficients"):
        with model.fixed_routing([1.0]):
            pass


def test_adapted_model_round_trip_in_fresh_process(setup, adapted, capsys):
    tmp, base, task_args, heads, data = setup
    cfg = json.loads((tmp / "adapted" / "config.json").read_text())
    ad = cfg["wemoe"]["adaptation"]
    assert ad["steps"] == 3 and ad["lr"] == 1e-2 and set(ad["data"]) == {"t0", "t1", "t2"} and ad["final_loss"] > 0
    assert cfg["tasks"] == ["t0", "t1", "t2"] and cfg["wemoe"]["router_layers"] == 2 and cfg["seed"] == 7
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp / "x.pt")
    script = (
        "import sys, torch, wemoe\n"
        f"m = wemoe.load({str(tmp / 'adapted')!r})\n"
        f"x = torch.load({str(tmp / 'x.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save({{'f': m(x), 'l': m.logits(x, 't2'), 'r': m.routing(x)}}, {str(tmp / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    y = torch.load(tmp / "y.pt")
    import wemoe

    m = wemoe.load(tmp / "adapted")
    with torch.no_grad():
        assert torch.equal(m(x), y["f"]) and torch.equal(m.logits(x, "t2"), y["l"])
        routes = m.routing(x)
    assert len(routes) == 2 and all(r.shape == (4, T) for r in routes)
    assert all(torch.equal(a, b) for a, b in zip(routes, y["r"]))
    # routers moved away from their initial bias (they were trained)
    assert not torch.allclose(routes[0], torch.full_like(routes[0], 0.3), atol=1e-3)
    # same seed, same inputs: byte-identical model and config
    code, _, err = merge(capsys, setup, "adapted2", "--heads", *heads, "--data", *data, "--steps", "3", "--lr", "1e-2", "--seed", "7")
    assert code == 0, err
    for f in ("model.safetensors", "config.json", "heads.safetensors"):
        a, b = (tmp / "adapted" / f).read_bytes(), (tmp / "adapted2" / f).read_bytes()
        if f == "config.json":
            a, b = a.replace(b"adapted2", b"adapted"), b.replace(b"adapted2", b"adapted")
        assert a == b, f


def test_per_sample_routing_and_router_only_gradients(setup, adapted, capsys):
    import wemoe

    tmp, base, task_args, heads, data = setup
    m = wemoe.load(tmp / "adapted")
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        full = m(x)
        alone = torch.cat([m(x[i : i + 1]) for i in range(6)])
        mixed = m(torch.cat([x[:3], torch.randn(9, 3, 32, 32)]))[:3]
    assert torch.allclose(full, alone, rtol=1e-5, atol=1e-6)
    assert torch.allclose(full[:3], mixed, rtol=1e-5, atol=1e-6)
    for p in m.router_parameters():
        p.requires_grad_(True)
    m.logits(x, "t0").logsumexp(-1).sum().backward()
    router = {id(p) for p in m.router_parameters()}
    assert all(p.grad is not None for p in m.router_parameters())
    assert all(p.grad is None for p in m.parameters() if id(p) not in router)
    assert all(not b.requires_grad for b in m.buffers())


def test_bfloat16_halves_the_checkpoint(setup, capsys):
    tmp, base, task_args, heads, data = setup
    code, _, err = merge(capsys, setup, "f32", "--heads", *heads)
    assert code == 0, err
    code, _, err = merge(capsys, setup, "bf16", "--heads", *heads, "--dtype", "bfloat16", "--moe-blocks", "last:1", "--router", "linear")
    assert code == 0, err
    cfg = json.loads((tmp / "bf16" / "config.json").read_text())
    assert cfg["wemoe"]["moe_blocks"] == [1] and cfg["wemoe"]["router"] == "linear" and cfg["wemoe"]["router_layers"] == 1 and cfg["dtype"] == "bfloat16"
    code, _, err = merge(capsys, setup, "bf16all", "--heads", *heads, "--dtype", "bfloat16")
    size = lambda d: (tmp / d / "model.safetensors").stat().st_size
    assert 0.45 < size("bf16all") / size("f32") < 0.55
    import wemoe

    m = wemoe.load(tmp / "bf16")
    assert m(torch.randn(2, 3, 32, 32)).dtype == torch.float32


def test_routes_and_export(setup, adapted, capsys):
    tmp, base, task_args, heads, data = setup
    code, stdout, err = run_cli(capsys, "routes", tmp / "adapted", "--task", *data, "--png", tmp / "r.png", "--json", tmp / "r.json", "-q")
    assert code == 0, err
    assert "task t1" in stdout and (tmp / "r.png").stat().st_size > 1000
    rep = json.loads((tmp / "r.json").read_text())
    assert rep["experts"] == ["t0", "t1", "t2"] and np.array(rep["mean_routing"]["t0"]).shape == (2, T)
    code, _, err = run_cli(capsys, "export", tmp / "adapted", "--task", "t1", "--out", tmp / "exp", "-q")
    assert code == 0, err
    import wemoe
    from wemoe.io.safetensors_io import load_tensors

    state, _ = load_tensors(tmp / "exp" / "model.safetensors")
    oc = open_clip_vit()
    oc.load_state_dict({k[len("visual.") :]: v for k, v in state.items()}, strict=True)
    m = wemoe.load(tmp / "adapted")
    coefs = torch.tensor(rep["mean_routing"]["t1"], dtype=torch.float32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = m.tokens(x)
        for i, blk in enumerate(m.blocks):
            h = h + blk.attn(blk.norm1(h))
            z = blk.norm2(h)
            h = h + blk.mlp(z, coefs[m.moe_blocks.index(i)].expand(3, T) if i in m.moe_blocks else None)
        expected = m.head(m.norm(h[:, 0]))
        got = oc(x)
    got = got[0] if isinstance(got, tuple) else got
    assert torch.allclose(got, expected, atol=1e-4)


def test_wemoe_option_errors(setup, capsys):
    tmp, base, task_args, heads, data = setup
    code, _, err = merge(capsys, setup, "e1", "--moe-blocks", "7")
    assert_one_line_error(code, err, "--moe-blocks", "0..1")
    code, _, err = merge(capsys, setup, "e2", "--data", data[0])
    assert_one_line_error(code, err, "needs its head")
    code, _, err = merge(capsys, setup, "e3", "--steps", "-3")
    assert_one_line_error(code, err, "--steps")
    code, _, err = merge(capsys, setup, "e4", "--heads", "zz=" + heads[0].split("=", 1)[1])
    assert_one_line_error(code, err, "'zz'")
    code, _, err = merge(capsys, setup, "e5", "--coef-range", "1,0")
    assert_one_line_error(code, err, "--coef-range")
    assert not any((tmp / f"e{i}").exists() for i in range(1, 6))
