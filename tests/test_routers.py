"""Router kinds and adaptation objectives: training-free routers equal straightforward computations,
objectives never read class labels, the constant router is layer-wise AdaMerging over the routed
groups, and bad combinations are one-line refusals."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import wemoe
from wemoe.io.safetensors_io import load_tensors
from wemoe.model.vit import VisionTransformer

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from factories import zoo
from test_adamerging import CLIP_MEAN, CLIP_STD, heads_and_data

T = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routers")
    base, tasks, base_state, states = zoo(tmp, "timm", tasks=T)
    heads, data = heads_and_data(tmp, T, n=20)
    return tmp, base, [f"t{i}={p}" for i, p in enumerate(tasks)], heads, data, base_state, states


def merge(capsys, setup, out, *extra, data=True):
    tmp, base, tasks, heads, dat, _, _ = setup
    return merge_cli(capsys, base, tasks, "wemoe", tmp / out, *extra, heads=heads, data=dat if data else None)


def preprocess(x: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - CLIP_MEAN) / CLIP_STD


def own_routed_state(base_state, states, t, lam, routed):
    """Plain weights of the model that routes every image to task t: base + tau_t on routed tensors, TA elsewhere."""
    out = {}
    for k, b in base_state.items():
        taus = [s[k] - b for s in states]
        out[k] = b + taus[t] if any(f".{g}." in k for g in routed) and k.startswith("blocks.") else b + lam * sum(taus)
    return out


def test_prototype_router_equals_a_direct_computation(setup, capsys):
    tmp, _, _, _, data, base_state, states = setup
    code, _, err = merge(
        capsys,
        setup,
        "proto",
        "--router",
        "prototype",
        "--experts",
        "mlp,attn",
        "--steps",
        "0",
        "--router-images",
        "12",
        "--router-temperature",
        "0.1",
        "--seed",
        "4",
    )
    assert code == 0, err
    model = wemoe.load(tmp / "proto")
    vit = VisionTransformer(model.arch, head_bias="head.bias" in base_state)
    rng = np.random.default_rng(4)
    expected = []  # per task: per routing entry, the mean token-averaged input of its group
    for t in range(T):
        x = np.load(data[f"t{t}"])["x"]
        idx = np.sort(rng.choice(len(x), size=12, replace=False))
        vit.load_state_dict(own_routed_state(base_state, states, t, 0.3, ("attn", "mlp")))
        h, means = vit.tokens(preprocess(x[idx])), []
        with torch.no_grad():
            for block in vit.blocks:
                a = block.norm1(h)
                means.append(a.mean(1).mean(0))
                h = h + block.attn(a)
                m = block.norm2(h)
                means.append(m.mean(1).mean(0))
                h = h + block.mlp(m)
        expected.append(means)
    for k, router in enumerate(model.routers()):
        want = torch.stack([expected[t][k] for t in range(T)])
        assert torch.allclose(router.prototypes, want, atol=1e-5), k
    # the routing itself: softmax of cosine similarity / temperature on the sample's token mean
    h = torch.randn(4, 9, model.arch.width)
    want = torch.softmax(F.normalize(h.mean(1), dim=-1) @ F.normalize(model.routers()[0].prototypes, dim=-1).T / 0.1, -1)
    assert torch.allclose(model.routers()[0](h), want, atol=1e-6)
    cfg = json.loads((tmp / "proto" / "config.json").read_text())
    assert cfg["wemoe"]["router"] == "prototype" and cfg["wemoe"]["router_options"]["temperature"] == 0.1


def test_subspace_router_equals_smile_routing(setup, capsys):
    tmp, _, _, _, _, base_state, states = setup
    code, _, err = merge(capsys, setup, "smile", "--router", "subspace", "--gate-rank", "3", "--router-top-k", "2", "--steps", "0", data=False)
    assert code == 0, err
    model = wemoe.load(tmp / "smile")
    h = torch.randn(5, 9, model.arch.width, generator=torch.Generator().manual_seed(0))
    for (b, group), router in zip(model.spec.routes(), model.routers()):
        key = f"blocks.{b}.mlp.fc1.weight"
        norms = []
        for s in states:
            v = torch.linalg.svd((s[key] - base_state[key]).double(), full_matrices=False)[2][:3].float()  # top right singular vectors
            norms.append((h @ v.T).norm(dim=-1).mean(1))  # per token, averaged: sign-free
        w = torch.softmax(torch.stack(norms, -1), -1)
        top = w.topk(2, -1)
        want = torch.zeros_like(w).scatter(-1, top.indices, top.values)
        want = want / want.sum(-1, keepdim=True)
        assert torch.allclose(router(h), want, atol=1e-5), (b, group)


@pytest.mark.parametrize("objective", ["entropy", "task", "entropy+task"])
def test_objectives_never_read_labels(setup, capsys, objective):
    tmp, base, tasks, heads, data, _, _ = setup
    shuffled = {}
    for name, path in data.items():
        z = dict(np.load(path))
        z["y"] = np.random.default_rng(9).permutation(z["y"])
        shuffled[name] = tmp / f"shuffled-{name}.npz"
        np.savez(shuffled[name], **z)
    outs = []
    for tag, dat in (("orig", data), ("shuf", shuffled)):
        out = tmp / f"labels-{objective}-{tag}"
        code, _, err = merge_cli(
            capsys,
            base,
            tasks,
            "wemoe",
            out,
            "--objective",
            objective,
            "--steps",
            "3",
            "--lr",
            "1e-2",
            "--batch-size",
            "5",
            heads=heads,
            data=dat,
        )
        assert code == 0, err
        outs.append(load_tensors(out / "model.safetensors")[0])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.allclose(v, torch.zeros_like(v)) for k, v in outs[0].items() if ".routers." in k)


def test_task_objective_pulls_routing_to_the_own_expert(setup, capsys):
    """Tasks whose images differ in colour: the task objective alone makes routing find each image's expert."""
    tmp, base, tasks, heads, _, _, _ = setup
    rng = np.random.default_rng(2)
    tinted = {}
    for t in range(T):
        x = rng.integers(0, 120, (40, 32, 32, 3), dtype=np.uint8)
        x[..., t] += 120  # task t: channel t brighter
        np.savez(tmp / f"tinted{t}.npz", x_train=x[:30], x_test=x[30:])
        tinted[f"t{t}"] = tmp / f"tinted{t}.npz"
    code, _, err = merge_cli(
        capsys,
        base,
        tasks,
        "wemoe",
        tmp / "task-obj",
        "--split",
        "train",
        "--objective",
        "task",
        "--router",
        "linear",
        "--steps",
        "30",
        "--lr",
        "5e-2",
        "--batch-size",
        "8",
        "--coef-range",
        "none",
        heads=heads,
        data=tinted,
    )
    assert code == 0, err
    model = wemoe.load(tmp / "task-obj")
    for t in range(T):  # held-out images of each task
        x = preprocess(np.load(tinted[f"t{t}"])["x_test"])
        with torch.no_grad():
            routes = torch.stack(model.routing(x))  # (groups, B, T)
        assert (routes.argmax(-1) == t).float().mean() == 1.0
        assert (routes[..., t] > 0.5).all()


def test_constant_router_is_layer_wise_adamerging_over_the_routed_groups(setup, capsys):
    """A reference: one coefficient per (block, group, task), merged weights through functional_call, same batches."""
    tmp, _, _, heads, data, base_state, states = setup
    steps, lr, batch, seed = 4, 2e-2, 6, 3
    code, _, err = merge(
        capsys,
        setup,
        "constant",
        "--router",
        "constant",
        "--experts",
        "mlp,attn",
        "--steps",
        str(steps),
        "--lr",
        str(lr),
        "--batch-size",
        str(batch),
        "--seed",
        str(seed),
        "--coef-range",
        "none",
    )
    assert code == 0, err
    model = wemoe.load(tmp / "constant")
    depth = model.arch.depth
    groups = [(b, g) for b in range(depth) for g in ("attn", "mlp")]
    coefs = torch.full((len(groups), T), 0.3, requires_grad=True)
    vit = VisionTransformer(model.arch, head_bias="head.bias" in base_state)
    opt = torch.optim.Adam([coefs], lr=lr)
    rng = np.random.default_rng(seed)
    xs = [np.load(data[f"t{i}"])["x"] for i in range(T)]
    ws = [load_tensors(heads[f"t{i}"])[0]["weight"] for i in range(T)]

    def group_of(key):
        parts = key.split(".")
        return groups.index((int(parts[1]), parts[2])) if key.startswith("blocks.") and parts[2] in ("attn", "mlp") else None

    for _ in range(steps):
        opt.zero_grad()
        for t in range(T):
            idx = rng.choice(len(xs[t]), size=batch, replace=False)
            params = {}
            for k, b in base_state.items():
                gi, taus = group_of(k), [s[k] - b for s in states]
                params[k] = b + 0.3 * sum(taus) if gi is None else b + sum(coefs[gi, j] * taus[j] for j in range(T))
            logits = F.normalize(functional_call(vit, params, (preprocess(xs[t][idx]),)), dim=-1) @ ws[t].T
            logp = F.log_softmax(logits, -1)
            (-(logp.exp() * logp).sum(-1).mean()).backward()
        opt.step()
    got = torch.stack([r.coefficients.detach() for r in model.routers()])  # routing order = groups order
    assert torch.allclose(got, coefs.detach(), atol=2e-5)
    assert (got - 0.3).abs().max() > 1e-3


@pytest.mark.parametrize("router", ["prototype", "subspace"])
def test_training_free_routers_reload_and_export_exactly(setup, capsys, router):
    tmp = setup[0]
    code, _, err = merge(capsys, setup, f"tf-{router}", "--router", router, "--steps", "2", "--lr", "1e-2", "--batch-size", "4")
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", tmp / f"tf-{router}", "--task", "t2", "--out", tmp / f"tf-{router}-export", "-q")
    assert code == 0, err
    exported = wemoe.load(tmp / f"tf-{router}-export")
    model = wemoe.load(tmp / f"tf-{router}")
    mean = torch.tensor(json.loads((tmp / f"tf-{router}-export" / "config.json").read_text())["parameters"]["mean_routing"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), wemoe.load(tmp / f"tf-{router}")(x))  # reload exact
        assert mean.shape == (model.arch.depth, T) and torch.allclose(mean.sum(-1), torch.ones(model.arch.depth))  # softmax routers
        with model.fixed_routing(mean[0]):
            if torch.allclose(mean, mean[0].expand_as(mean)):
                assert torch.allclose(exported(x), model(x), atol=1e-5)
    assert exported.task_names == ["t2"] and torch.isfinite(exported(x)).all()


def test_router_and_objective_refusals(setup, capsys):
    tmp = setup[0]
    code, _, err = merge(capsys, setup, "bad1", "--objective", "task", data=False)
    assert_one_line_error(code, err, "--objective task needs --data")
    code, _, err = merge(capsys, setup, "bad2", "--router", "prototype", data=False)
    assert_one_line_error(code, err, "--router prototype needs --data")
    code, _, err = merge(capsys, setup, "bad3", "--router", "oracle")
    assert_one_line_error(code, err, "--router must be one of mlp, linear, constant, prototype, subspace")
    code, _, err = merge(capsys, setup, "bad4", "--objective", "accuracy")
    assert_one_line_error(code, err, "--objective must be one of entropy, task, entropy+task")
    code, _, err = merge(capsys, setup, "bad5", "--router", "subspace", "--gate-rank", "65", data=False)
    assert_one_line_error(code, err, "--gate-rank 65 is above the smaller side (64)")
    code, _, err = merge(capsys, setup, "bad6", "--coef-guard", "soft")
    assert_one_line_error(code, err, "--coef-guard must be one of clamp, straight-through")
    assert not any((tmp / f"bad{i}").exists() for i in range(1, 7))


@pytest.mark.parametrize("guard", ["clamp", "straight-through"])
def test_coefficient_guard_keeps_gradients_only_when_straight_through(setup, capsys, guard):
    """The small case that got stuck: 3 tasks, random heads, lr 1e-2, 30 steps, coefficients kept in [0, 1]."""
    tmp = setup[0]
    code, _, err = merge(capsys, setup, f"guard-{guard}", "--coef-guard", guard, "--steps", "30", "--lr", "1e-2", "--batch-size", "8")
    assert code == 0, err
    model = wemoe.load(tmp / f"guard-{guard}")
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    routes = torch.stack(model.routing(x))
    params = model.router_parameters()
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(model.logits(x, "t0").logsumexp(-1).sum(), params, allow_unused=True)
    flowing = sum(float(g.abs().sum()) for g in grads if g is not None)
    at_bounds = ((routes == 0) | (routes == 1)).float().mean().item()
    assert routes.min() >= 0 and routes.max() <= 1  # both keep the range in the forward
    if guard == "clamp":
        assert at_bounds == 1.0 and flowing == 0.0  # every coefficient pinned: the routers can no longer learn
    else:
        assert flowing > 0.0  # gradients still reach the routers
