"""LoRA fine-tunes as tasks: a PEFT adapter folder is the task vector ``scale * B @ A`` on its targets.

The reference is PEFT's own ``merge_and_unload`` on tiny models built here (Hugging Face
CLIPVisionModel from the installed transformers, open_clip's VisionTransformer)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_vision import DEPTH, EMBED, HEADS, IMAGE, PATCH, WIDTH, vision_config
from safetensors import safe_open

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from clip_factories import image_folder
from factories import write

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HF_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1"]


def lora(model, path, seed, **config):
    """A LoRA fine-tune of ``model`` with random (non-zero) factors, saved as PEFT saves it; returns PEFT's merged state dict."""
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False} | config
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(path)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A transformers 5 CLIPVisionModel base, and LoRA adapters of it with PEFT's merged weights."""
    tmp = tmp_path_factory.mktemp("lora_hf")
    torch.manual_seed(0)
    transformers.CLIPVisionModel(vision_config()).eval().save_pretrained(tmp / "base")
    fresh = lambda: transformers.CLIPVisionModel.from_pretrained(tmp / "base").eval()
    refs = {
        "plain": lora(fresh(), tmp / "plain", 1, target_modules=HF_TARGETS),
        "patterns": lora(fresh(), tmp / "patterns", 2, target_modules=HF_TARGETS, rank_pattern={"fc1": 2}, alpha_pattern={"v_proj": 3}),
        "rslora": lora(fresh(), tmp / "rslora", 3, target_modules=["k_proj", "fc2"], use_rslora=True, r=8, lora_alpha=5),
    }
    return tmp, refs


def test_adapter_task_equals_peft_merge_and_unload(hf, capsys):
    tmp, refs = hf
    for name, reference in refs.items():
        out = tmp / f"ta_{name}"
        code, _, err = merge_cli(capsys, tmp / "base", {name: tmp / name}, "task-arithmetic", out, "--lambda", "1")
        assert code == 0, err
        merged = read(out / "model.safetensors")
        assert set(merged) == set(reference) - {"embeddings.position_ids"} or set(merged) == set(reference)
        for key, tensor in merged.items():
            torch.testing.assert_close(tensor, reference[key], rtol=0, atol=2e-6, msg=f"{name}: {key}")
        record = json.loads((out / "wemoe.json").read_text())
        assert record["inputs"]["tasks"][name]["scheme"] == "peft-lora"


def test_adapter_and_its_merged_model_give_the_same_merge(hf, capsys):
    """Two tasks, one an adapter and one a full fine-tune: the same as giving PEFT's merged model for the adapter."""
    tmp, refs = hf
    full = tmp / "patterns_merged"
    base = transformers.CLIPVisionModel.from_pretrained(tmp / "base")
    base.load_state_dict(refs["patterns"])
    base.save_pretrained(full)
    other = tmp / "rslora_merged"
    base.load_state_dict(refs["rslora"])
    base.save_pretrained(other)
    code, _, err = merge_cli(capsys, tmp / "base", {"a": tmp / "patterns", "b": other}, "ties", tmp / "ties_adapter")
    assert code == 0, err
    code, _, err = merge_cli(capsys, tmp / "base", {"a": full, "b": other}, "ties", tmp / "ties_full")
    assert code == 0, err
    adapter, dense = read(tmp / "ties_adapter" / "model.safetensors"), read(tmp / "ties_full" / "model.safetensors")
    for key in dense:
        torch.testing.assert_close(adapter[key], dense[key], rtol=0, atol=2e-6, msg=key)


def test_open_clip_naming(tmp_path, capsys):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=4.0, output_dim=EMBED).eval()
    base = write(tmp_path / "base.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()}, {"heads": str(HEADS), "activation": "gelu"})
    reference = lora(model, tmp_path / "adapter", 5, target_modules=["c_fc", "c_proj", "out_proj"])
    out = tmp_path / "out"
    code, _, err = merge_cli(capsys, base, {"oc": tmp_path / "adapter"}, "task-arithmetic", out, "--lambda", "1")
    assert code == 0, err
    merged = read(out / "model.safetensors")
    assert set(merged) == set(reference)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[key], rtol=0, atol=2e-6, msg=key)


def _edited(src, dst, config=None, tensors=None):
    import shutil

    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text()) | config
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        state = tensors(read(dst / "adapter_model.safetensors"))
        write(dst / "adapter_model.safetensors", state)
    return dst


def test_adapter_validation_is_one_line(hf, capsys):
    tmp, _ = hf
    plain = tmp / "plain"
    cases = {
        "rank": (_edited(plain, tmp / "bad_rank", {"r": 3}), ("not rank 3",)),
        "alpha": (_edited(plain, tmp / "bad_alpha", {"lora_alpha": 0}), ("lora_alpha", "positive")),
        "dora": (_edited(plain, tmp / "bad_dora", {"use_dora": True}), ("DoRA",)),
        "type": (_edited(plain, tmp / "bad_type", {"peft_type": "IA3"}), ("IA3", "LoRA")),
        "saved": (_edited(plain, tmp / "bad_saved", {"modules_to_save": ["classifier"]}), ("modules_to_save",)),
    }
    for path, fragments in cases.values():
        code, _, err = run_cli(capsys, "merge", "--base", tmp / "base", "--tasks", f"t={path}", "--out", tmp / "never", "--dry-run")
        assert_one_line_error(code, err, str(path), *fragments)
    # an adapter of a wider model
    torch.manual_seed(0)
    wide = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**(vision_config().to_dict() | {"hidden_size": 2 * WIDTH})))
    lora(wide, tmp / "wide", 1, target_modules=["fc1"])
    capsys.readouterr()
    code, _, err = run_cli(capsys, "merge", "--base", tmp / "base", "--tasks", f"t={tmp / 'wide'}", "--out", tmp / "never", "--dry-run")
    assert_one_line_error(code, err, "encoder.layers.0.mlp.fc1", "weight, the base's is", "another model")
    # a target wemoe does not merge (PEFT adapts the patch embedding's convolution too)
    lora(transformers.CLIPVisionModel.from_pretrained(tmp / "base"), tmp / "conv", 1, target_modules=["patch_embedding", "fc1"])
    capsys.readouterr()  # transformers' loading bar
    code, _, err = run_cli(capsys, "merge", "--base", tmp / "base", "--tasks", f"t={tmp / 'conv'}", "--out", tmp / "never", "--dry-run")
    assert_one_line_error(code, err, "embeddings.patch_embedding", "not a linear layer")
    # an adapter is a task, never the base
    code, _, err = run_cli(capsys, "merge", "--base", plain, "--tasks", f"t={tmp / 'rslora'}", "--out", tmp / "never", "--dry-run")
    assert_one_line_error(code, err, "is a task, not a base")


def test_dry_run_plan_names_the_adapter(hf, capsys):
    tmp, _ = hf
    code, plan, err = run_cli(capsys, "merge", "--base", tmp / "base", "--tasks", f"p={tmp / 'patterns'}", "--out", tmp / "never", "--dry-run")
    assert code == 0, err
    assert "peft-lora" in plan and "LoRA adapter, rank 4, alpha 8" in err


@pytest.fixture(scope="module")
def adapting(hf):
    """Unlabeled images and heads for the adapter tasks p (patterns) and r (rslora)."""
    tmp, _ = hf
    data = image_folder(tmp / "data", ["a", "b"], per_class=2)
    heads = {t: write(tmp / "heads" / f"{t}.safetensors", {"weight": torch.randn(2, WIDTH)}) for t in ("p", "r")}
    return data, heads


def test_wemoe_merge_with_adapter_tasks(hf, adapting, capsys):
    tmp, _ = hf
    data, heads = adapting
    out = tmp / "moe"
    tasks = {"p": tmp / "patterns", "r": tmp / "rslora"}
    code, _, err = merge_cli(capsys, tmp / "base", tasks, "wemoe", out, "--steps", "1", "--batch-size", "2", heads=heads, data={"p": data, "r": data})
    assert code == 0, err
    assert_experts_are_the_adapters(out, tmp, hf[1])


def assert_experts_are_the_adapters(out, tmp, refs, atol=2e-6):
    """The routed fc1 of block 0 holds each adapter's exact task vector (zero for an adapter that leaves fc1 alone)."""
    import wemoe

    model = wemoe.load(out)
    base = read(tmp / "base" / "model.safetensors")["encoder.layers.0.mlp.fc1.weight"]
    dw, _ = model.get_submodule("blocks.0.mlp.fc1.experts").task_vectors()
    for i, name in enumerate(("patterns", "rslora")):
        torch.testing.assert_close(dw[i], refs[name]["encoder.layers.0.mlp.fc1.weight"] - base, rtol=0, atol=atol)
    assert dw[1].abs().max() == 0  # the rslora adapter targets k_proj and fc2 only


def test_adapter_factors_are_the_low_rank_experts(hf, adapting, capsys):
    """With --expert-rank R at least an adapter's rank, its own factors are its experts: exact, no SVD."""
    tmp, refs = hf
    data, heads = adapting
    tasks = {"p": tmp / "patterns", "r": tmp / "rslora"}
    flags = ["--steps", "0", "--experts", "mlp,attn"]
    out = tmp / "moe_rank8"
    # patterns: q and v (rank 4 each) share block N's qkv, so rank 8 there; rslora: rank 8
    code, _, err = merge_cli(capsys, tmp / "base", tasks, "wemoe", out, *flags, "--expert-rank", "8", heads=heads, data={"p": data, "r": data})
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())
    energy = record["wemoe"]["energy_kept"]
    assert energy and all(v == 1.0 for values in energy.values() for v in values)
    assert_experts_are_the_adapters(out, tmp, refs, atol=1e-6)
    import wemoe

    model = wemoe.load(out)
    base = read(tmp / "base" / "model.safetensors")
    dw, _ = model.get_submodule("blocks.1.attn.qkv.experts").task_vectors()
    for i, name in enumerate(("patterns", "rslora")):
        expected = torch.cat([refs[name][f"encoder.layers.1.self_attn.{x}_proj.weight"] - base[f"encoder.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"])
        torch.testing.assert_close(dw[i], expected, rtol=0, atol=1e-6)
    # below an adapter's rank its product is truncated by SVD, as for any task vector (energy < 1 recorded)
    out = tmp / "moe_rank4"
    code, _, err = merge_cli(capsys, tmp / "base", tasks, "wemoe", out, *flags, "--expert-rank", "4", heads=heads, data={"p": data, "r": data})
    assert code == 0, err
    energy = json.loads((out / "config.json").read_text())["wemoe"]["energy_kept"]
    assert energy["blocks.0.mlp.fc1"][0] == 1.0 and energy["blocks.0.attn.qkv"][0] < 1.0


def test_adapter_of_a_full_clip_model_merges_its_image_tower(tmp_path, capsys):
    """PEFT on a whole CLIPModel adapts both towers; the text tower's modules are left out with a note."""
    text = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=HEADS, num_hidden_layers=1, vocab_size=64, max_position_embeddings=8)
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(vision_config=vision_config().to_dict(), text_config=text, projection_dim=EMBED)
    transformers.CLIPModel(config).eval().save_pretrained(tmp_path / "clip")
    reference = lora(transformers.CLIPModel.from_pretrained(tmp_path / "clip"), tmp_path / "adapter", 7, target_modules=["q_proj", "fc2", "text_projection"])
    capsys.readouterr()
    out = tmp_path / "out"
    code, _, err = merge_cli(capsys, tmp_path / "clip", {"c": tmp_path / "adapter"}, "task-arithmetic", out, "--lambda", "1")
    assert code == 0, err
    merged = read(out / "model.safetensors")
    assert merged and all(k.startswith(("vision_model.", "visual_projection.")) for k in merged)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[key], rtol=0, atol=2e-6, msg=key)
    code, _, err = run_cli(capsys, "merge", "--base", tmp_path / "clip", "--tasks", f"c={tmp_path / 'adapter'}", "--out", tmp_path / "n", "--dry-run")
    assert code == 0 and "LoRA modules outside the image tower left out" in err


def test_inspect_an_adapter(hf, capsys):
    tmp, _ = hf
    code, text, err = run_cli(capsys, "inspect", tmp / "patterns")
    assert code == 0, err
    assert "PEFT LoRA adapter" in text and "rank:          2, 4 (config r 4)" in text and "hf_clip_vision naming" in text
    assert "adapts:        attn.proj, attn.qkv, mlp.fc1 in blocks 0, 1" in text
    code, raw, err = run_cli(capsys, "inspect", tmp / "rslora", "--json")
    assert code == 0, err
    record = json.loads(raw)
    assert record["rslora"] and record["targets"]["encoder.layers.0.mlp.fc2"]["scale"] == pytest.approx(5 / 8**0.5)
