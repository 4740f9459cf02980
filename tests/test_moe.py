"""WeightEnsemblingMLP (tiled, vectorized) against the naive per-sample loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wemoe.errors import WemoeError
from wemoe.model.activations import get_activation
from wemoe.model.moe import WeightEnsemblingMLP
from wemoe.model.moe_reference import naive_moe_forward
from wemoe.model.router import Router

D, H, T, N = 24, 56, 4, 5


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only add synchronisation cost (badly so on a
    # loaded machine); restore the session setting afterwards
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tensors(seed=0, d=D, h=H, t=T):
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1_weight": torch.randn(h, d, generator=g) * 0.2,
        "fc1_bias": torch.randn(h, generator=g) * 0.1,
        "fc2_weight": torch.randn(d, h, generator=g) * 0.2,
        "fc2_bias": torch.randn(d, generator=g) * 0.1,
        "expert_fc1_weight": torch.randn(t, h, d, generator=g) * 0.1,
        "expert_fc1_bias": torch.randn(t, h, generator=g) * 0.1,
        "expert_fc2_weight": torch.randn(t, d, h, generator=g) * 0.1,
        "expert_fc2_bias": torch.randn(t, d, generator=g) * 0.1,
    }


def make(activation="gelu", layers=2, seed=0, spread=0.3, **kw):
    """A module whose router gives clearly different coefficients per sample."""
    m = WeightEnsemblingMLP(**tensors(seed), activation=activation, router_layers=layers, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in m.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * spread)
    return m


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def inputs(batch, seed=1, requires_grad=False):
    x = torch.randn(batch, N, D, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_forward_matches_naive_loop(activation, layers):
    m = make(activation, layers)
    for batch in (1, 3, 16, 17):
        x = inputs(batch)
        with torch.no_grad():
            ref = naive_moe_forward(m, x)
            for chunk, tile in ((None, None), (1, H), (5, 7), (64, 16)):
                m.chunk_size, m.tile_rows = chunk, tile
                got = m(x)
                assert got.shape == (batch, N, D)
                assert rel(got, ref) < 1e-5, (batch, chunk, tile)


def test_naive_references_agree():
    """The expert-by-expert merge (the original module's way) and the einsum merge are the same function."""
    m = make("gelu", 2)
    x = inputs(5)
    with torch.no_grad():
        a = naive_moe_forward(m, x, merge="einsum")
        b = naive_moe_forward(m, x, merge="loop")
    assert a.shape == b.shape == (5, N, D)
    assert rel(a, b) < 1e-6


def test_routing_actually_differs_per_sample():
    # guards the other tests: with identical routing a per-sample bug could hide
    m = make()
    r = m.routing_weights(inputs(8)).detach()
    assert (r.max(0).values - r.min(0).values).min() > 1e-3


@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("chunk,tile", [(None, None), (3, 7), (1, H), (16, 13)])
def test_gradients_match_naive_loop(layers, chunk, tile):
    m = make("quick_gelu", layers, chunk_size=chunk, tile_rows=tile)
    params = list(m.router.parameters())
    x = inputs(7, requires_grad=True)
    gout = torch.randn(7, N, D, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((m(x) * gout).sum(), [x, *params])
    ref = torch.autograd.grad((naive_moe_forward(m, x) * gout).sum(), [x, *params])
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert rel(a, b) < 1e-5


def test_gradient_through_routing_override():
    m = make(chunk_size=2, tile_rows=9)
    x = inputs(5, requires_grad=True)
    r = torch.rand(5, T, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    got = torch.autograd.grad(m(x, routing=r).pow(2).sum(), [x, r])
    ref = torch.autograd.grad(naive_moe_forward(m, x, routing=r).pow(2).sum(), [x, r])
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-5


def test_input_without_grad_still_trains_router():
    m = make(chunk_size=4, tile_rows=16)
    x = inputs(6)
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.router.parameters())


def test_sample_independent_of_batch_companions():
    m = make(chunk_size=4, tile_rows=16)
    x = inputs(9)
    other = torch.randn(9, N, D, generator=torch.Generator().manual_seed(9)) * 3
    mixed = other.clone()
    mixed[2] = x[2]
    with torch.no_grad():
        full = m(x)
        alone = m(x[2:3])
        mixed_out = m(mixed)
    assert rel(full[2], alone[0]) < 1e-6
    assert rel(mixed_out[2], alone[0]) < 1e-6


def test_zero_router_weights_equal_task_arithmetic_mlp():
    lam = 0.3
    m = WeightEnsemblingMLP(**tensors(2), activation="gelu", router_layers=2, init_lambda=lam)
    with torch.no_grad():
        m.router.hidden.weight.zero_()
        m.router.out.weight.zero_()
    t = tensors(2)
    w1 = t["fc1_weight"] + lam * t["expert_fc1_weight"].sum(0)
    b1 = t["fc1_bias"] + lam * t["expert_fc1_bias"].sum(0)
    w2 = t["fc2_weight"] + lam * t["expert_fc2_weight"].sum(0)
    b2 = t["fc2_bias"] + lam * t["expert_fc2_bias"].sum(0)
    x = inputs(4)
    with torch.no_grad():
        want = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        got = m(x)
        plain = m.merged_mlp(torch.full((T,), lam))
    assert torch.allclose(m.last_routing, torch.full((4, T), lam))
    assert rel(got, want) < 1e-5
    for key, value in {"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2}.items():
        assert plain[key].shape == value.shape
        assert torch.allclose(plain[key], value, atol=1e-6)


def test_merged_mlp_matches_forced_routing():
    m = make("quick_gelu")
    c = torch.tensor([0.5, -0.2, 1.0, 0.1])
    x = inputs(3)
    with torch.no_grad():
        got = m(x, routing=c)
        p = m.merged_mlp(c)
        act = get_activation("quick_gelu")
        want = F.linear(act(F.linear(x, p["fc1.weight"], p["fc1.bias"])), p["fc2.weight"], p["fc2.bias"])
    assert torch.equal(m.last_routing, c.expand(3, T))
    assert rel(got, want) < 1e-5


def test_only_router_is_trainable_and_buffers_persist():
    m = make()
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("router.") for n in names)
    assert not any(b.requires_grad for b in m.buffers())
    sd = m.state_dict()
    for key in ("fc1_weight", "fc1_bias", "fc2_weight_t", "fc2_bias", "expert_fc1_weight",
                "expert_fc1_bias", "expert_fc2_weight_t", "expert_fc2_bias"):
        assert key in sd
    assert sd["expert_fc2_weight_t"].shape == (T, H, D)
    m(inputs(2)).sum().backward()
    assert not any(b.requires_grad or b.grad is not None for b in m.buffers())


def test_state_dict_round_trip():
    a = make("gelu", 2, seed=0)
    b = make("gelu", 2, seed=7)  # different buffers and router
    x = inputs(3)
    with torch.no_grad():
        assert rel(a(x), b(x)) > 1e-3
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x), b(x))


def test_coef_range_clamps():
    m = make(coef_range=(-0.1, 0.2))
    with torch.no_grad():
        m.router.out.bias.copy_(torch.tensor([5.0, -5.0, 0.05, 5.0]))
        m.router.out.weight.zero_()
        y = m(inputs(3))
    want = torch.tensor([0.2, -0.1, 0.05, 0.2]).expand(3, T)
    assert torch.allclose(m.last_routing, want)
    with torch.no_grad():
        assert rel(y, m(inputs(3), routing=want[0])) < 1e-6
    free = make()
    with torch.no_grad():
        free.router.out.bias.fill_(5.0)
        free.router.out.weight.zero_()
        free(inputs(2))
    assert torch.allclose(free.last_routing, torch.full((2, T), 5.0))


def test_bfloat16_buffers():
    m = make("gelu", 2, chunk_size=3, tile_rows=10)
    ref32 = make("gelu", 2, chunk_size=3, tile_rows=10)
    m = m.to(torch.bfloat16)
    # float32 reference with the same (bf16-rounded) numbers
    ref32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    assert m.fc1_weight.dtype == torch.bfloat16 and m.expert_fc2_weight_t.dtype == torch.bfloat16
    x = inputs(5)
    y = m(x)
    assert y.dtype == torch.float32  # output follows the input dtype
    with torch.no_grad():
        want = naive_moe_forward(ref32, x)
    assert rel(y.detach(), want) < 3e-2
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.router.parameters())


def test_router_shapes_and_init():
    x = inputs(3)
    for layers in (0, 1, 2):
        r = Router(D, T, layers=layers, init_lambda=0.3)
        out = r(x)
        assert out.shape == (3, T)
        assert (out - 0.3).abs().max() < 0.1
    r2 = Router(D, T)
    assert torch.all(r2.hidden.bias == 0) and torch.all(r2.out.bias == 0.3)
    assert 0.005 < r2.hidden.weight.std().item() < 0.02


def test_bad_arguments_raise_wemoe_error():
    t = tensors()
    with pytest.raises(WemoeError):
        WeightEnsemblingMLP(**t, activation="relu6")
    bad = dict(t, expert_fc2_weight=t["expert_fc2_weight"][:, :, :-1])
    with pytest.raises(WemoeError):
        WeightEnsemblingMLP(**bad, activation="gelu")
    with pytest.raises(WemoeError):
        WeightEnsemblingMLP(**t, activation="gelu", router_layers=3)
    m = make()
    with pytest.raises(WemoeError):
        m(inputs(2), routing=torch.zeros(T + 1))
    with pytest.raises(WemoeError):
        m(torch.zeros(2, N, D + 1))


@pytest.mark.parametrize("use_threads", [True, False])
def test_parallel_tile_paths_match_naive_loop(monkeypatch, use_threads):
    # the autouse fixture pins 1 thread; here 2 threads exercise the tile worker pool
    # (use_threads=True) and the intra-op path (False)
    from wemoe.model import moe

    monkeypatch.setattr(moe, "USE_TILE_THREADS", use_threads)
    torch.set_num_threads(2)
    m = make("gelu", 2, chunk_size=3, tile_rows=5)
    params = list(m.router.parameters())
    x = inputs(7, requires_grad=True)
    y = m(x)
    assert "ContractLinear" in type(y.grad_fn).__name__  # workers recorded no graph of their own
    ref = naive_moe_forward(m, x)
    assert rel(y.detach(), ref.detach()) < 1e-5
    got = torch.autograd.grad(y.pow(2).sum(), [x, *params])
    want = torch.autograd.grad(ref.pow(2).sum(), [x, *params])
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5
    assert torch.get_num_threads() == 2
    if use_threads:  # workers run single-threaded ops; the caller keeps its setting
        assert moe._POOL is not None and moe._POOL.submit(torch.get_num_threads).result() == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_forward_under_inference_mode(threads):
    """Tile workers (or the caller itself, on one thread) keep the caller's inference mode."""
    import wemoe.model.moe as moe_mod

    torch.set_num_threads(threads)
    try:
        T, H, D = 3, 256, 16
        g = torch.Generator().manual_seed(0)
        m = moe_mod.WeightEnsemblingMLP(
            torch.randn(H, D, generator=g), torch.randn(H, generator=g), torch.randn(D, H, generator=g), torch.randn(D, generator=g),
            torch.randn(T, H, D, generator=g), torch.randn(T, H, generator=g), torch.randn(T, D, H, generator=g), torch.randn(T, D, generator=g),
            activation="gelu", tile_rows=64,
        )
        x = torch.randn(4, 5, D, generator=g)
        with torch.no_grad():
            ref = m(x)
        with torch.inference_mode():
            got = m(x)
        assert torch.equal(got, ref)  # static tile-to-slot split: bitwise reproducible
    finally:
        torch.set_num_threads(1)
