"""Routed linears (dense tiled kernels, low-rank experts) and MoE blocks against
per-sample references that merge one sample's weights and run plain layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wemoe.core.arch import ViTArch
from wemoe.errors import WemoeError
from wemoe.model.vit import Mlp, RoutingTrace
from wemoe.moe import kernels
from wemoe.moe.block import MoEBlock
from wemoe.moe.experts import DenseExperts, LowRankExperts, store_of_rank, truncated_svd
from wemoe.moe.reference import block_reference, linear_reference
from wemoe.moe.routed import RoutedLinear, routed_linear_factory
from wemoe.moe.routers import Router

D, H, T, N = 24, 56, 4, 5


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only add synchronisation cost (badly so on a
    # loaded machine); restore the session setting afterwards
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def fill(layer: RoutedLinear, seed: int) -> RoutedLinear:
    """Random pretrained weights and task vectors (low-rank stores get factors of random matrices)."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = layer.out_features, layer.in_features
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.2)
        layer.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
        e = layer.experts
        e.bias.copy_(torch.randn(T, out_f, generator=g) * 0.1)
        if isinstance(e, DenseExperts):
            dw = torch.randn(T, out_f, in_f, generator=g) * 0.1
            e.stack.copy_(dw if e.expanding else dw.transpose(1, 2))
        else:
            e.down.copy_(torch.randn(T, e.rank, in_f, generator=g) * 0.3)
            e.up.copy_(torch.randn(T, e.rank, out_f, generator=g) * 0.3)
    return layer


def routed(in_f, out_f, rank=None, seed=0) -> RoutedLinear:
    return fill(routed_linear_factory(T, store_of_rank(rank))(in_f, out_f), seed)


def coefs(batch, seed=3, requires_grad=False):
    return (torch.rand(batch, T, generator=torch.Generator().manual_seed(seed)) * 1.5 - 0.25).requires_grad_(requires_grad)


def inputs(batch, width=D, seed=1, requires_grad=False):
    return torch.randn(batch, N, width, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


@pytest.mark.parametrize("shape", [(D, H), (H, D), (D, D), (D, 3 * D)], ids=["expand", "contract", "square", "qkv"])
@pytest.mark.parametrize("rank", [None, 3])
def test_routed_linear_matches_per_sample_merge(shape, rank):
    layer = routed(*shape, rank=rank)
    for batch in (1, 3, 16, 17):
        x, c = inputs(batch, shape[0]), coefs(batch)
        with torch.no_grad():
            ref = linear_reference(layer, x, c)
            settings = ((None, None), (1, 10**6), (5, 7), (64, 16)) if rank is None else ((None, None),)
            for chunk, tile in settings:
                if rank is None:
                    layer.experts.chunk_size, layer.experts.tile_rows = chunk, tile
                got = layer(x, c)
                assert got.shape == (batch, N, shape[1])
                assert rel(got, ref) < 1e-5, (batch, chunk, tile)


@pytest.mark.parametrize("shape", [(D, H), (H, D)], ids=["expand", "contract"])
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("chunk,tile", [(None, None), (3, 7), (1, 10**6), (16, 13)])
def test_routed_linear_gradients_match_reference(shape, rank, chunk, tile):
    layer = routed(*shape, rank=rank)
    if rank is None:
        layer.experts.chunk_size, layer.experts.tile_rows = chunk, tile
    x, c = inputs(7, shape[0], requires_grad=True), coefs(7, requires_grad=True)
    gout = torch.randn(7, N, shape[1], generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((layer(x, c) * gout).sum(), [x, c])
    ref = torch.autograd.grad((linear_reference(layer, x, c) * gout).sum(), [x, c])
    for a, b in zip(got, ref):
        assert a.shape == b.shape and rel(a, b) < 1e-5


def test_low_rank_at_full_rank_equals_dense():
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(H, D, generator=g), torch.randn(H, generator=g)
    taus, tau_b = torch.randn(T, H, D, generator=g) * 0.1, torch.randn(T, H, generator=g) * 0.1
    dense = routed_linear_factory(T, store_of_rank(None))(D, H)
    low = routed_linear_factory(T, store_of_rank(D))(D, H)
    with torch.no_grad():
        for layer in (dense, low):
            layer.weight.copy_(w0)
            layer.bias.copy_(b0)
            layer.experts.bias.copy_(tau_b)
        dense.experts.weight.copy_(taus)
        energy = []
        for t in range(T):
            down, up, kept = truncated_svd(taus[t], D)
            low.experts.down[t], low.experts.up[t] = down, up
            energy.append(kept)
    assert all(abs(e - 1.0) < 1e-6 for e in energy)
    x, c = inputs(6), coefs(6)
    with torch.no_grad():
        assert rel(low(x, c), dense(x, c)) < 1e-5
        for a, b in zip(low.merged(c[0]), dense.merged(c[0])):
            assert rel(a, b) < 1e-5


def test_truncated_svd_keeps_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(40, 30, generator=g)
    down, up, kept = truncated_svd(m, 5)
    approx = up.t() @ down
    s = torch.linalg.svdvals(m.double())
    assert abs(kept - float((s[:5] ** 2).sum() / (s**2).sum())) < 1e-9
    # Eckart-Young: the residual is the energy of the dropped singular values
    assert abs((m - approx).pow(2).sum().item() - float((s[5:] ** 2).sum())) < 1e-3


def make_block(groups=("mlp",), rank=None, layers=2, coef_range=None, activation="gelu", seed=0, spread=0.3):
    """A MoE block whose routers give clearly different coefficients per sample."""
    arch = ViTArch(width=D, depth=1, heads=2, patch_size=4, image_size=8, mlp_width=H, activation=activation)
    torch.manual_seed(seed)
    routers = {grp: Router(D, T, layers=layers) for grp in groups}
    block = MoEBlock(arch, T, groups, store_of_rank(rank), routers, coef_range)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for k, (_name, layer) in enumerate(block.named_modules()):
            if isinstance(layer, RoutedLinear):
                fill(layer, seed + k)
        for p in block.routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * spread)
    return block.eval()


@pytest.mark.parametrize("groups", [("mlp",), ("attn",), ("attn", "mlp")], ids=["mlp", "attn", "both"])
@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_block_forward_and_router_gradients_match_reference(groups, rank, layers):
    block = make_block(groups, rank, layers, activation="quick_gelu")
    x = inputs(6, requires_grad=True)
    trace = RoutingTrace()
    y = block(x, trace)
    routes = trace.routes
    assert len(routes) == len(groups) and all(r.shape == (6, T) for r in routes)
    ref = block_reference(block, x)
    assert rel(y.detach(), ref.detach()) < 1e-5
    params = list(block.routers.parameters())
    gout = torch.randn_like(y)
    got = torch.autograd.grad((y * gout).sum(), [x, *params])
    want = torch.autograd.grad((ref * gout).sum(), [x, *params])
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5


def test_routing_differs_per_sample_and_samples_are_independent():
    block = make_block(("attn", "mlp"))
    x = inputs(9)
    trace = RoutingTrace()
    with torch.no_grad():
        full = block(x, trace)
        alone = block(x[2:3])
        mixed = torch.randn(9, N, D, generator=torch.Generator().manual_seed(9)) * 3
        mixed[2] = x[2]
        mixed_out = block(mixed)
    # guards the other tests: with identical routing a per-sample bug could hide
    assert all((r.max(0).values - r.min(0).values).min() > 1e-3 for r in trace.routes)
    assert rel(full[2], alone[0]) < 1e-6 and rel(mixed_out[2], alone[0]) < 1e-6


def test_zero_router_weights_equal_task_arithmetic():
    lam = 0.3
    block = make_block(("attn", "mlp"))
    with torch.no_grad():
        for r in block.routers.values():
            r.hidden.weight.zero_()
            r.out.weight.zero_()
            r.out.bias.fill_(lam)
    x = inputs(4)
    plain = make_block(("attn", "mlp"))
    with torch.no_grad():
        for group in ("attn", "mlp"):
            for name, layer in block.routed_linears(group).items():
                w, b = layer.merged(torch.full((T,), lam))
                dw, db = layer.experts.task_vectors()
                assert torch.allclose(w, layer.weight + lam * dw.sum(0), atol=1e-6)
                assert torch.allclose(b, layer.bias + lam * db.sum(0), atol=1e-6)
                target = plain.routed_linears(group)[name]
                target.weight.copy_(w)
                target.bias.copy_(b)
                target.experts.bias.zero_()
                target.experts.stack.zero_()
        plain.load_state_dict({k: v for k, v in block.state_dict().items() if ".routers." in k or "norm" in k}, strict=False)
        assert rel(block(x), plain(x)) < 1e-5


def test_only_routers_train_and_buffers_persist():
    block = make_block(("attn", "mlp"), rank=3)
    names = {n for n, p in block.named_parameters() if p.requires_grad and ".routers." not in f".{n}"}
    assert names <= {n for n, _ in block.named_parameters() if n.startswith(("norm1", "norm2"))}
    sd = block.state_dict()
    for key in (
        "attn.qkv.weight",
        "attn.qkv.experts.down",
        "attn.qkv.experts.up",
        "attn.qkv.experts.bias",
        "mlp.fc2.weight",
        "mlp.fc2.experts.up",
        "routers.attn.hidden.weight",
        "routers.mlp.out.bias",
    ):
        assert key in sd, key
    assert sd["mlp.fc2.experts.down"].shape == (T, 3, H) and sd["mlp.fc2.experts.up"].shape == (T, 3, D)
    dense = make_block(("mlp",)).state_dict()
    assert dense["mlp.fc1.experts.weight"].shape == (T, H, D) and dense["mlp.fc2.experts.weight_t"].shape == (T, H, D)


def test_state_dict_round_trip():
    a, b = make_block(seed=0), make_block(seed=7)
    x = inputs(3)
    with torch.no_grad():
        assert rel(a(x), b(x)) > 1e-3
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x), b(x))


def test_coef_range_clamps_and_fixed_routing_overrides():
    block = make_block(coef_range=(-0.1, 0.2))
    with torch.no_grad():
        block.routers["mlp"].out.bias.copy_(torch.tensor([5.0, -5.0, 0.05, 5.0]))
        block.routers["mlp"].out.weight.zero_()
        h = block.norm2(inputs(3))
        assert torch.allclose(block.coefficients("mlp", h), torch.tensor([0.2, -0.1, 0.05, 0.2]).expand(3, T))
        given = torch.tensor([1.0, 0.0, 0.0, 3.0]).expand(3, T)
        assert torch.equal(block.coefficients("mlp", h, given), given)  # given coefficients are not clamped
        assert block.coefficients("attn", h, given) is None  # a group without experts takes none
        block.coef_range = None
        assert torch.allclose(block.coefficients("mlp", h), torch.tensor([5.0, -5.0, 0.05, 5.0]).expand(3, T))


def test_bfloat16_buffers():
    layer = routed(D, H)
    ref32 = routed(D, H)
    layer.experts.chunk_size, layer.experts.tile_rows = 3, 10
    layer = layer.to(torch.bfloat16)
    ref32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})  # same (bf16-rounded) numbers
    assert layer.weight.dtype == torch.bfloat16 and layer.experts.weight.dtype == torch.bfloat16
    x, c = inputs(5), coefs(5, requires_grad=True)
    y = layer(x, c)
    assert y.dtype == torch.float32  # output follows the input dtype
    with torch.no_grad():
        want = linear_reference(ref32, x, c)
    assert rel(y.detach(), want) < 3e-2
    y.sum().backward()
    assert c.grad is not None and torch.isfinite(c.grad).all()


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


def test_router_built_on_meta_then_materialized_equals_one_built_on_cpu():
    torch.manual_seed(11)
    cpu = [Router(D, T, layers=k) for k in (2, 1, 0)]
    with torch.device("meta"):
        meta = [Router(D, T, layers=k) for k in (2, 1, 0)]
    torch.manual_seed(11)
    for r in meta:
        r.materialize("cpu")
    for a, b in zip(cpu, meta):
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n


def test_bad_arguments_raise_wemoe_error():
    with pytest.raises(WemoeError):
        Mlp(D, H, "relu6")
    with pytest.raises(WemoeError):
        Router(D, T, layers=3)
    with pytest.raises(WemoeError, match="rank must be between 1 and 24"):
        LowRankExperts(T, D, H, rank=25)
    with pytest.raises(WemoeError, match="unknown expert group"):
        make_block(("ffn",))
    layer, x = routed(D, H), inputs(2)
    # without coefficients a routed linear is its pretrained layer (the pass a shared router reads)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(WemoeError, match="merging needs 4 coefficients"):
        routed(D, H).merged(torch.zeros(T + 1))


@pytest.mark.parametrize("use_threads", [True, False])
@pytest.mark.parametrize("shape", [(D, H), (H, D)], ids=["expand", "contract"])
def test_parallel_tile_paths_match_reference(monkeypatch, use_threads, shape):
    # the autouse fixture pins 1 thread; here 2 threads exercise the tile worker pool
    # (use_threads=True) and the intra-op path (False)
    monkeypatch.setattr(kernels, "USE_TILE_THREADS", use_threads)
    torch.set_num_threads(2)
    layer = routed(*shape)
    layer.experts.chunk_size, layer.experts.tile_rows = 3, 5
    x, c = inputs(7, shape[0], requires_grad=True), coefs(7, requires_grad=True)
    y = layer(x, c)
    assert "Linear" in type(y.grad_fn).__name__ or y.grad_fn is not None  # workers recorded no graph of their own
    ref = linear_reference(layer, x, c)
    assert rel(y.detach(), ref.detach()) < 1e-5
    got = torch.autograd.grad(y.pow(2).sum(), [x, c])
    want = torch.autograd.grad(ref.pow(2).sum(), [x, c])
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5
    assert torch.get_num_threads() == 2
    if use_threads:  # workers run single-threaded ops; the caller keeps its setting
        assert kernels._POOL is not None and kernels._POOL.submit(torch.get_num_threads).result() == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_forward_under_inference_mode(threads):
    """Tile workers (or the caller itself, on one thread) keep the caller's inference mode."""
    torch.set_num_threads(threads)
    try:
        layer = routed(16, 256)
        layer.experts.tile_rows = 64
        mlp = Mlp(16, 256, "gelu", linear=lambda i, o: layer if o == 256 else fill(routed_linear_factory(T, store_of_rank(None))(i, o), 5))
        x, c = torch.randn(4, 5, 16), coefs(4)
        with torch.no_grad():
            ref = mlp(x, c)
        with torch.inference_mode():
            got = mlp(x, c)
        assert torch.equal(got, ref)  # static tile-to-slot split: bitwise reproducible
    finally:
        torch.set_num_threads(1)


def test_activation_applies_between_routed_linears():
    mlp = Mlp(D, H, "quick_gelu", linear=lambda i, o: routed(i, o, seed=i + o))
    x, c = inputs(3), coefs(3)
    with torch.no_grad():
        want = linear_reference(mlp.fc2, F.silu(linear_reference(mlp.fc1, x, c) * 1.702) / 1.702, c)
        assert rel(mlp(x, c), want) < 1e-5
