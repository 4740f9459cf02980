"""AdaMerging: trained coefficients equal a straightforward reference, the written
checkpoint is theta_0 + sum c tau with them, and --steps 0 is task arithmetic exactly."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from wemoe.io.safetensors_io import load_tensors, save_tensors

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from factories import timm_vit, zoo

T, CLASSES, SEED = 3, 4, 5
CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def heads_and_data(tmp, tasks: int, n: int = 24):
    """Random cosine heads (16 features) and random uint8 images per task, as name -> path."""
    rng = np.random.default_rng(1)
    heads, data = {}, {}
    for i in range(tasks):
        w = torch.randn(CLASSES, 16, generator=torch.Generator().manual_seed(100 + i)) * 5
        save_tensors(tmp / f"head{i}.safetensors", {"weight": w}, {"normalize": "true"})
        np.savez(tmp / f"data{i}.npz", x=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, CLASSES, n))
        heads[f"t{i}"], data[f"t{i}"] = str(tmp / f"head{i}.safetensors"), str(tmp / f"data{i}.npz")
    return heads, data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ada")
    base, tasks, base_state, states = zoo(tmp, "timm", tasks=T)
    heads, data = heads_and_data(tmp, T)
    return tmp, base, tasks, base_state, states, heads, data


def merge(capsys, setup, name, *extra):
    tmp, base, tasks, _, _, heads, data = setup
    return merge_cli(
        capsys,
        base,
        tasks,
        "adamerging",
        tmp / name,
        "--seed",
        str(SEED),
        *extra,
        heads=heads,
        data=data,
    )


def reference_adamerging(base_state, states, heads, data, granularity, steps, lr, batch):
    """AdaMerging written out plainly: timm's ViT, a loop over tasks for the merge, the same batches."""
    model = timm_vit()
    keys = [k for k, v in base_state.items() if v.is_floating_point()]
    groups = {k: (0 if granularity == "task" else i) for i, k in enumerate(keys)}
    raw = torch.full((T, 1 if granularity == "task" else len(keys)), 0.3, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr)
    rng = np.random.default_rng(SEED)
    xs = [np.load(data[f"t{i}"])["x"] for i in range(T)]
    ws = [load_tensors(heads[f"t{i}"])[0]["weight"] for i in range(T)]
    for _ in range(steps):
        opt.zero_grad()
        for t in range(T):
            idx = rng.choice(len(xs[t]), size=batch, replace=batch > len(xs[t]))
            images = (torch.from_numpy(xs[t][idx]).permute(0, 3, 1, 2).float() / 255 - CLIP_MEAN) / CLIP_STD
            c = raw.clamp(0, 1)
            params = {}
            for k, b in base_state.items():
                if k not in groups:
                    params[k] = b
                    continue
                merged = b
                for j, s in enumerate(states):
                    merged = merged + c[j, groups[k]] * (s[k] - b)
                params[k] = merged
            logits = F.normalize(functional_call(model, params, (images,)), dim=-1) @ ws[t].T
            logp = F.log_softmax(logits, -1)
            (-(logp.exp() * logp).sum(-1).mean()).backward()
        opt.step()
    return {k: raw.clamp(0, 1)[:, groups[k]].detach() for k in keys}


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_coefficients_and_checkpoint_equal_reference(setup, capsys, granularity):
    tmp, base, tasks, base_state, states, heads, data = setup
    code, _, err = merge(capsys, setup, f"ada-{granularity}", "--granularity", granularity, "--steps", "4", "--lr", "0.02", "--batch-size", "6")
    assert code == 0, err
    cfg = json.loads((tmp / f"ada-{granularity}" / "config.json").read_text())
    assert cfg["method"] == "adamerging" and cfg["parameters"]["granularity"] == granularity
    section = cfg["adamerging"]
    if granularity == "task":
        assert section["groups"] == ["all"]
    else:  # one group per float tensor, in the canonical order
        assert sorted(section["groups"]) == sorted(k for k, v in base_state.items() if v.is_floating_point())
    ref = reference_adamerging(base_state, states, heads, data, granularity, steps=4, lr=0.02, batch=6)
    got = torch.tensor([section["coefficients"][f"t{i}"] for i in range(T)])  # (tasks, groups)
    for gi, group in enumerate(section["groups"]):
        key = next(iter(ref)) if group == "all" else group
        assert torch.allclose(got[:, gi], ref[key], atol=2e-5), group
    moved = (got - 0.3).abs().max().item()
    assert moved > 0.01, "coefficients did not train"
    merged, _ = load_tensors(tmp / f"ada-{granularity}" / "model.safetensors")
    for k, b in base_state.items():
        if not b.is_floating_point():
            continue
        c = got[:, 0 if granularity == "task" else section["groups"].index(k)]
        expected = b + sum(c[j] * (s[k] - b) for j, s in enumerate(states))
        assert torch.allclose(merged[k], expected, atol=1e-5, rtol=1e-5), k
    card = (tmp / f"ada-{granularity}" / "README.md").read_text()  # the card shows what it was adapted on
    assert "Adapted on (unlabeled use of the images):" in card and f"| t2 | `{data['t2']}` |" in card
    assert "in 4 steps" in card and "task arithmetic with coefficients adapted on unlabeled data" in card


def test_zero_steps_is_task_arithmetic_bit_for_bit(setup, capsys):
    tmp, base, tasks, _, _, _, _ = setup
    code, _, err = merge(capsys, setup, "ada-0", "--steps", "0")
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "merge", "--base", base, "--tasks", *[f"t{i}={p}" for i, p in enumerate(tasks)], "--lambda", "0.3", "--out", tmp / "ta-0.3", "-q"
    )
    assert code == 0, err
    a, _ = load_tensors(tmp / "ada-0" / "model.safetensors")
    b, _ = load_tensors(tmp / "ta-0.3" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adamerging_refusals(setup, capsys):
    tmp, base, tasks, _, _, heads, data = setup
    code, _, err = merge(capsys, setup, "bad1", "--granularity", "block")
    assert_one_line_error(code, err, "--granularity must be one of task, layer")
    assert code == 2  # a bad choice is a usage error, as a bad --method is
    code, _, err = merge_cli(capsys, base, tasks, "adamerging", tmp / "bad2", data={"t0": data["t0"]})
    assert_one_line_error(code, err, "--data for task 't0' needs its head")
    code, _, err = run_cli(
        capsys, "merge", "--base", base, "--tasks", *map(str, tasks), "--method", "task-arithmetic", "--granularity", "task", "--out", tmp / "bad3", "-q"
    )
    assert_one_line_error(code, err, "--granularity only applies to --method adamerging")
    assert not any((tmp / n).exists() for n in ("bad1", "bad2", "bad3"))
