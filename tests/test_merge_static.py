"""Static merges equal an independent computation, write back in the base's
layout, and load into timm / open_clip with strict key matching."""

import json

import pytest
import torch

from wemoe.io.safetensors_io import load_tensors

from cli_helpers import run_cli
from factories import ARCH, open_clip_vit, timm_vit, zoo


def reference_ties(base, tasks, lam, k):
    """Straightforward TIES per tensor: threshold by sorting, loops over tasks."""
    taus = []
    for t in tasks:
        tau = (t - base).flatten()
        keep = int(round(tau.numel() * k / 100))
        trimmed = torch.zeros_like(tau)
        if keep > 0:
            order = torch.argsort(tau.abs(), descending=True, stable=True)[:keep]
            trimmed[order] = tau[order]
        taus.append(trimmed)
    total = sum(taus)
    sign = torch.sign(total)
    num = torch.zeros_like(total)
    cnt = torch.zeros_like(total)
    for tau in taus:
        agree = (torch.sign(tau) == sign) & (tau != 0)
        num += torch.where(agree, tau, torch.zeros_like(tau))
        cnt += agree.float()
    return base + lam * (num / cnt.clamp(min=1)).view_as(base)


def expected(method, base, states, lam=0.3, k=20):
    out = {}
    for key, b in base.items():
        ts = [s[key] for s in states]
        if not b.is_floating_point():
            out[key] = b
        elif method == "average":
            out[key] = sum(ts) / len(ts)
        elif method == "task-arithmetic":
            out[key] = b + lam * sum(t - b for t in ts)
        else:
            out[key] = reference_ties(b, ts, lam, k)
    return out


@pytest.mark.parametrize("kind", ["open_clip", "timm"])
@pytest.mark.parametrize("method,extra", [("average", []), ("task-arithmetic", ["--lambda", "0.4"]), ("ties", ["--lambda", "0.7", "--ties-k", "30"])])
def test_static_merge_equals_independent_computation(tmp_path, capsys, kind, method, extra):
    base_path, task_paths, base, states = zoo(tmp_path, kind)
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "merge", "--base", base_path, "--tasks", *[f"t{i}={p}" for i, p in enumerate(task_paths)], "--method", method, "--out", out, "--quiet", *extra
    )
    assert code == 0, err
    merged, meta = load_tensors(out / "model.safetensors")
    lam = 0.4 if method == "task-arithmetic" else 0.7
    ref = expected(method, base, states, lam=lam, k=30)
    assert merged.keys() == ref.keys()
    for key in ref:
        assert torch.allclose(merged[key], ref[key], rtol=1e-6, atol=1e-6), key
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["tasks"] == ["t0", "t1", "t2"] and config["scheme"] == kind
    assert json.loads(meta["tasks"]) == ["t0", "t1", "t2"] and meta["method"] == method
    assert len(config["inputs"]["base"]["sha256"]) == 64

    x = torch.randn(2, 3, 32, 32)
    if kind == "timm":
        model, ref_model = timm_vit(), timm_vit()
        model.load_state_dict(merged, strict=True)
    else:
        model, ref_model = open_clip_vit(), open_clip_vit()
        model.load_state_dict({k[len("visual.") :]: v for k, v in merged.items()}, strict=True)
    ref_model.load_state_dict({k[len("visual.") :] if kind != "timm" else k: v for k, v in ref.items()}, strict=True)
    a, b = model(x), ref_model(x)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert torch.allclose(a, b, atol=1e-5)


def test_bfloat16_output_and_sharding(tmp_path, capsys):
    base_path, task_paths, base, states = zoo(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", "--base", base_path, "--tasks", *task_paths, "--out", out, "--dtype", "bfloat16", "--shard-size", "50KB", "-q")
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    merged = {}
    for s in shards:
        merged.update(load_tensors(out / s)[0])
    ref = expected("task-arithmetic", base, states)
    for key, v in merged.items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, ref[key].to(torch.bfloat16)), key
    # a merge output reads back as a checkpoint itself
    code, stdout, err = run_cli(capsys, "inspect", out)
    assert code == 0 and "open_clip" in stdout and "task-arithmetic" in stdout


def test_hf_task_without_projection_takes_it_from_base(tmp_path, capsys):
    from factories import hf_state_from_open_clip, perturbed, write

    oc = {k: v.contiguous() for k, v in open_clip_vit().state_dict().items()}
    base = hf_state_from_open_clip(oc)
    base_path = write(tmp_path / "base" / "model.safetensors", base).parent
    (base_path / "config.json").write_text(json.dumps(__import__("factories").hf_config()))
    tasks = []
    for i in range(2):
        s = perturbed(base, 20 + i)
        s.pop("visual_projection.weight")
        tasks.append(write(tmp_path / f"task{i}.safetensors", s))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", "--base", base_path, "--tasks", *tasks, "--out", out, "--arch", str(write_arch(tmp_path)))
    assert code == 0, err
    assert "projection" in err and "taken from the base" in err
    merged, _ = load_tensors(out / "model.safetensors")
    assert torch.equal(merged["visual_projection.weight"], base["visual_projection.weight"])
    assert torch.equal(merged["vision_model.embeddings.position_ids"], base["vision_model.embeddings.position_ids"])
    assert "vision_model.encoder.layers.1.self_attn.k_proj.weight" in merged


def write_arch(tmp_path):
    p = tmp_path / "arch.json"
    p.write_text(json.dumps(ARCH))
    return p
