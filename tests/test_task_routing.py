"""Routers computed once per image (task, exemplar), task-agnostic prediction and evaluation:
each checked against a computation written out here, on tasks whose images differ in colour."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wemoe
from wemoe.data import load_data, preprocess

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from factories import tinted_tasks

T = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three tasks; task t's images have channel t brighter (so telling them apart is learnable)."""
    tmp = tmp_path_factory.mktemp("taskrouting")
    base, tasks, heads, data = tinted_tasks(tmp, tasks=T)
    return tmp, base, tasks, heads, data


@pytest.fixture(scope="module")
def task_routed(setup):
    from wemoe.cli import main

    tmp, base, tasks, heads, data = setup
    out = tmp / "task"
    args = ["merge", "--base", base, "--tasks", *[f"t{i}={p}" for i, p in enumerate(tasks)], "--method", "wemoe", "--out", out, "-q"]
    args += ["--heads", *[f"{k}={v}" for k, v in heads.items()], "--data", *[f"{k}={v}" for k, v in data.items()]]
    args += ["--experts", "mlp,attn", "--expert-rank", "4", "--router", "task", "--router-images", "40", "--router-epochs", "20", "--split", "train"]
    try:
        main([str(a) for a in [*args, "--steps", "0"]])
    except SystemExit as exc:
        assert not exc.code
    return out


def test_task_router_tells_the_tasks_apart_and_drives_every_group(setup, task_routed):
    tmp, _, _, _, data = setup
    model = wemoe.load(task_routed)
    cfg = json.loads((task_routed / "config.json").read_text())
    assert cfg["wemoe"]["router"] == "task" and cfg["wemoe"]["router_fit"]["images"] == 3 * 40
    assert cfg["wemoe"]["router_fit"]["train_accuracy"] > 0.9
    for t in range(T):
        images = preprocess(load_data(data[f"t{t}"], "test").arrays, model.arch)
        routes = model.routing(images)
        assert len(routes) == 2 * 2 and all(torch.equal(r, routes[0]) for r in routes)  # one router drives every group
        assert torch.allclose(routes[0].sum(-1), torch.ones(len(images)), atol=1e-5)  # a posterior
        assert (routes[0].argmax(-1) == t).float().mean() > 0.9


def test_task_router_is_its_mlp_on_the_pretrained_pass(setup, task_routed):
    """The shared router's input is a pass with every routed linear at its pretrained weight; written out here."""
    tmp, _, _, _, data = setup
    model = wemoe.load(task_routed)
    images = preprocess(load_data(data["t1"], "test").arrays[:5], model.arch)
    with torch.no_grad():
        x = model.tokens(images)
        parts = []
        for block in model.blocks:
            h = block.norm1(x)
            parts += [h.mean(1), x[:, 0]]
            qkv = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).reshape(5, -1, 3, 2, 32).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(5, -1, 64)
            x = x + F.linear(a, block.attn.proj.weight, block.attn.proj.bias)
            z = F.gelu(F.linear(block.norm2(x), block.mlp.fc1.weight, block.mlp.fc1.bias))
            x = x + F.linear(z, block.mlp.fc2.weight, block.mlp.fc2.bias)
        parts.append(model.head(model.norm(x[:, 0])))
        feats = torch.cat(parts, 1)
        r = model.task_router
        expected = torch.softmax(r.out(torch.relu(r.hidden((feats - r.mean) / r.std))), -1)
        assert torch.allclose(model.router_features(images), feats, atol=1e-5)
        assert torch.allclose(model.routing(images)[0], expected, atol=1e-5)


def test_predict_names_the_task_and_uses_its_head(setup, task_routed):
    tmp, _, _, _, data = setup
    model = wemoe.load(task_routed)
    images = preprocess(np.concatenate([load_data(data[f"t{t}"], "test").arrays[:4] for t in range(T)]), model.arch)
    pred = model.predict(images)
    assert pred.tasks == [model.task_names[i] for i in pred.task_index.tolist()]
    assert (pred.task_index == torch.arange(T).repeat_interleave(4)).float().mean() > 0.9
    with torch.no_grad():
        posterior = model.routing(images)[0]
        for i, t in enumerate(pred.tasks):
            probs = torch.softmax(model.logits(images[i : i + 1], t), -1)[0]
            assert pred.labels[i] == probs.argmax()
            assert torch.isclose(pred.confidence[i], posterior[i].max() * probs.max(), atol=1e-5)
    assert pred.labels.dtype == torch.long and pred.task_posterior.shape == (3 * 4, T)


def test_eval_task_agnostic_reports_identification_and_joint_accuracy(setup, task_routed, capsys):
    tmp, _, _, _, data = setup
    specs = [f"t{t}=:{data[f't{t}']}" for t in range(T)]
    code, out, err = run_cli(capsys, "eval", task_routed, "--task", *specs, "--task-agnostic", "--json", tmp / "ta.json", "--card", "-q")
    assert code == 0, err
    report = json.loads((tmp / "ta.json").read_text())
    model = wemoe.load(task_routed)
    for t in range(T):
        d = load_data(data[f"t{t}"], "test")
        pred = model.predict(preprocess(d.arrays, model.arch))
        right = pred.task_index == t
        assert report[f"t{t}"]["task_accuracy"] == pytest.approx(right.float().mean().item())
        joint = right & (pred.labels == torch.from_numpy(d.labels))
        assert report[f"t{t}"]["joint_accuracy"] == pytest.approx(joint.float().mean().item())
        assert sum(report[f"t{t}"]["predicted"].values()) == len(d)
    assert report["task_agnostic"]["joint_accuracy"] == pytest.approx(np.mean([report[f"t{t}"]["joint_accuracy"] for t in range(T)]))
    assert "task id" in out and "joint" in out and "wrote the accuracies into" in err
    card = (task_routed / "README.md").read_text()
    assert "| task | accuracy | task identified | joint (task-agnostic) |" in card


def test_task_agnostic_refusals(setup, task_routed, capsys):
    tmp, base, tasks, heads, data = setup
    spec = f"t0={heads['t0']}:{data['t0']}"
    code, _, err = merge_cli(capsys, base, tasks, "task-arithmetic", tmp / "ta-plain")
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", tmp / "ta-plain", "--task", spec, "--task-agnostic")
    assert_one_line_error(code, err, "--task-agnostic needs a mixture-of-experts output")
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "no-heads", "--steps", "0")
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", tmp / "no-heads", "--task", spec, "--task-agnostic")
    assert_one_line_error(code, err, "needs every merged task's head", "stores no heads")
    with pytest.raises(wemoe.WemoeError, match="has no heads"):
        wemoe.load(tmp / "no-heads").predict(torch.randn(2, 3, 32, 32))


def test_exemplar_router_votes_among_stored_embeddings(setup, capsys):
    tmp, base, tasks, heads, data = setup
    out = tmp / "exemplar"
    code, _, err = merge_cli(
        capsys,
        base,
        tasks,
        "wemoe",
        out,
        "--router",
        "exemplar",
        "--router-images",
        "20",
        "--router-neighbours",
        "5",
        "--steps",
        "0",
        "--split",
        "train",
        heads=heads,
        data=data,
    )
    assert code == 0, err
    model = wemoe.load(out)
    bank = model.task_router.exemplars
    assert bank.shape == (3 * 20, 16) and torch.allclose(bank.norm(dim=-1), torch.ones(60), atol=1e-5)
    images = preprocess(np.concatenate([load_data(data[f"t{t}"], "test").arrays[:6] for t in range(T)]), model.arch)
    with torch.no_grad():
        emb = F.normalize(model.router_features(images)[:, -16:], dim=-1)
        nearest = (emb @ bank.T).topk(5, dim=-1).indices // 20  # the task owning each neighbour
        expected = torch.stack([torch.bincount(row, minlength=T).float() / 5 for row in nearest])
        assert torch.equal(model.routing(images)[0], expected)
    assert (expected.argmax(-1) == torch.arange(T).repeat_interleave(6)).float().mean() > 0.8


def test_exemplar_router_refuses_fewer_images_than_asked(setup, capsys):
    tmp, base, tasks, heads, data = setup
    code, _, err = merge_cli(
        capsys, base, tasks, "wemoe", tmp / "never", "--router", "exemplar", "--router-images", "50", "--split", "train", heads=heads, data=data
    )
    assert_one_line_error(code, err, "--router-images 50 images per task, but t0 has 40, t1 has 40, t2 has 40")
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--router", "task", heads=heads, data={"t0": data["t0"]})
    assert_one_line_error(code, err, "--router task", "missing: t1, t2")
    assert not (tmp / "never").exists()


@pytest.fixture(scope="module")
def everything_routed(setup):
    """--experts all with dense experts, a task router and the base fallback for unseen images."""
    from wemoe.cli import main

    tmp, base, tasks, heads, data = setup
    out = tmp / "all"
    args = ["merge", "--base", base, "--tasks", *[f"t{i}={p}" for i, p in enumerate(tasks)], "--method", "wemoe", "--out", out, "-q"]
    args += ["--heads", *[f"{k}={v}" for k, v in heads.items()], "--data", *[f"{k}={v}" for k, v in data.items()], "--split", "train"]
    args += ["--experts", "all", "--router", "task", "--router-images", "40", "--unseen", "base", "--unseen-images", "40", "--steps", "0"]
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert not exc.code
    return out


def test_everything_routed_one_hot_is_each_fine_tuned_model_and_zero_the_base(setup, everything_routed):
    from wemoe.checkpoints.checkpoint import open_checkpoint
    from wemoe.model.vit import build_vit

    tmp, base, tasks, _, _ = setup
    model = wemoe.load(everything_routed)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = lambda path: build_vit(open_checkpoint(path).arch, open_checkpoint(path).state_dict())
    with torch.no_grad():
        for t, path in enumerate(tasks):
            with model.fixed_routing(torch.eye(T)[t]):
                assert torch.allclose(model(x), plain(path)(x), atol=2e-5)
        with model.fixed_routing(torch.zeros(T)):
            assert torch.allclose(model(x), plain(base)(x), atol=2e-5)
        assert torch.allclose(model.router_features(x)[:, -16:], plain(base)(x), atol=2e-5)  # the router reads the base model


def test_everything_routed_equals_the_per_sample_reference(setup, everything_routed):
    from wemoe.moe.reference import reference_forward

    tmp, _, _, _, data = setup
    model = wemoe.load(everything_routed)
    images = preprocess(np.concatenate([load_data(data[f"t{t}"], "test").arrays[:2] for t in range(T)]), model.arch)
    with torch.no_grad():
        assert torch.allclose(model(images), reference_forward(model, images), atol=1e-5)


def test_unseen_images_are_served_by_the_base_model(setup, everything_routed):
    from wemoe.checkpoints.checkpoint import open_checkpoint
    from wemoe.model.vit import build_vit

    tmp, base, _, _, data = setup
    model = wemoe.load(everything_routed)
    cfg = json.loads((everything_routed / "config.json").read_text())["wemoe"]
    assert cfg["unseen"] == "base" and cfg["rest"] is True and cfg["unseen_fit"]["keep"] == 0.99 and cfg["unseen_fit"]["kept"] >= 0.9
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 3  # like none of the tasks
    seen = preprocess(np.concatenate([load_data(data[f"t{t}"], "test").arrays for t in range(T)]), model.arch)
    with torch.no_grad():
        pred = model.predict(torch.cat([noise, seen]))
        assert pred.unseen[:4].all() and pred.unseen[4:].float().mean() < 0.1
        ck = open_checkpoint(base)
        assert torch.allclose(model(noise), build_vit(ck.arch, ck.state_dict())(noise), atol=2e-5)
        scores = model.unseen.score(model.router_features(noise))
        assert (scores > model.unseen.threshold).all()


def test_export_of_an_everything_routed_model_is_the_merge_it_bakes_in(setup, everything_routed, capsys):
    from wemoe.checkpoints.checkpoint import open_checkpoint
    from wemoe.model.vit import build_vit

    tmp, _, _, _, data = setup
    code, _, err = run_cli(capsys, "export", everything_routed, "--task", "t1", "--data", data["t1"], "--out", tmp / "all-export", "-q")
    assert code == 0, err
    record = json.loads((tmp / "all-export" / "config.json").read_text())
    coefs = torch.tensor(record["parameters"]["mean_routing"][0])
    model = wemoe.load(everything_routed)
    ck = open_checkpoint(tmp / "all-export")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), model.fixed_routing(coefs):
        assert torch.allclose(build_vit(ck.arch, ck.state_dict())(x), model(x), atol=2e-5)


def test_everything_routed_and_unseen_refusals(setup, capsys):
    tmp, base, tasks, heads, data = setup
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--experts", "all", heads=heads, data=data)
    assert_one_line_error(code, err, "--experts all routes the embeddings too", "--router task, exemplar")
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--unseen", "base", heads=heads, data=data)
    assert_one_line_error(code, err, "--unseen base reads the embedding", "--router task, exemplar")
    code, _, err = merge_cli(
        capsys, base, tasks, "wemoe", tmp / "never", "--router", "task", "--unseen", "task-arithmetic", heads=heads, data={"t0": data["t0"], "t1": data["t1"]}
    )
    assert_one_line_error(code, err, "--unseen task-arithmetic is calibrated on every merged task's images", "missing: t2")
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--unseen", "sometimes", heads=heads)
    assert_one_line_error(code, err, "--unseen must be one of route, base, task-arithmetic")
    assert not (tmp / "never").exists()
