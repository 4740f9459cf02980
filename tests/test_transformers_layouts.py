"""Folders saved by the installed transformers, both image-tower classes and a full CLIPModel.

transformers 5 saves ``CLIPVisionModel`` without the ``vision_model.`` prefix and
``CLIPVisionModelWithProjection`` with it; wemoe reads both, writes outputs in the layout
of the base, and says at merge time what a projection-less base means for loading."""

from __future__ import annotations

import json

import pytest
import torch
from hf_vision import DEPTH, EMBED, HEADS, IMAGE, WIDTH, vision_config
from safetensors import safe_open

import wemoe
from wemoe.checkpoints.checkpoint import open_checkpoint
from wemoe.outputs.loading import load_for_inference

from cli_helpers import run_cli
from clip_factories import image_folder
from factories import write

transformers = pytest.importorskip("transformers")


def saved(cls, path, seed: int, base=None, scale: float = 0.02):
    """``cls`` saved by transformers into ``path``: random init, or ``base``'s weights moved by noise."""
    torch.manual_seed(seed)
    model = cls(vision_config()).eval()
    if base is not None:
        state = {k: v + scale * torch.randn_like(v) * v.std().nan_to_num(0) if v.is_floating_point() else v for k, v in base.state_dict().items()}
        model.load_state_dict(state)
    model.save_pretrained(path)
    return model


def keys_of(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def images(n=3):
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tf")
    bare = saved(transformers.CLIPVisionModel, tmp / "bare", 0)
    proj = saved(transformers.CLIPVisionModelWithProjection, tmp / "proj", 0)
    bare_tasks = [tmp / f"bare_t{i}" for i in range(2)]
    for i, p in enumerate(bare_tasks):
        saved(transformers.CLIPVisionModel, p, 10 + i, base=bare)
    proj_tasks = [tmp / f"proj_t{i}" for i in range(2)]
    for i, p in enumerate(proj_tasks):
        saved(transformers.CLIPVisionModelWithProjection, p, 20 + i, base=proj)
    return tmp, bare_tasks, proj_tasks


def test_installed_transformers_saves_the_two_layouts(folders):
    tmp, _, _ = folders
    assert "embeddings.class_embedding" in keys_of(tmp / "bare") or "vision_model.embeddings.class_embedding" in keys_of(tmp / "bare")
    assert "vision_model.embeddings.class_embedding" in keys_of(tmp / "proj") and "visual_projection.weight" in keys_of(tmp / "proj")


def test_bare_and_prefixed_layouts_read_to_the_same_canonical_weights(folders):
    tmp, _, _ = folders
    bare, proj = open_checkpoint(tmp / "bare"), open_checkpoint(tmp / "proj")
    assert bare.scheme in ("hf_clip_vision", "hf_clip") and proj.scheme == "hf_clip"
    assert set(proj.keys()) - set(bare.keys()) == {"head.weight"}  # the bare tower has no projection
    assert bare.arch.width == WIDTH and bare.arch.depth == DEPTH and bare.arch.activation == "quick_gelu"
    for key in bare.keys():
        torch.testing.assert_close(bare.get(key), proj.get(key), rtol=0, atol=0)  # same seed, same init
    # the bare layout, read without transformers: the model wemoe builds matches CLIPVisionModel's pooled output
    model = transformers.CLIPVisionModel.from_pretrained(tmp / "bare").eval()
    with torch.no_grad():
        ours = load_for_inference(tmp / "bare").module(images())
        torch.testing.assert_close(ours, model(pixel_values=images()).pooler_output, atol=1e-5, rtol=0)


def test_merge_of_a_bare_clip_vision_model_is_written_bare_and_loads_complete(folders, capsys):
    tmp, bare_tasks, _ = folders
    out = tmp / "bare_ta"
    code, _, err = run_cli(capsys, "merge", "--base", tmp / "bare", "--tasks", *[f"t{i}={p}" for i, p in enumerate(bare_tasks)], "--out", out)
    assert code == 0, err
    assert "load the output with CLIPVisionModel" in err and "visual_projection.weight missing" in err  # said at merge time
    assert keys_of(out) == keys_of(tmp / "bare")  # the input's own layout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["CLIPVisionModel"] and config["model_type"] == "clip_vision_model"
    model, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(wemoe.load(out)(images()), model.eval()(pixel_values=images()).pooler_output, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "CLIPVisionModel.from_pretrained" in card and "CLIPVisionModelWithProjection" not in card


def test_prefixed_base_with_bare_tasks_is_written_prefixed(folders, capsys):
    tmp, bare_tasks, proj_tasks = folders
    out = tmp / "proj_ta"
    tasks = [f"a={bare_tasks[0]}", f"b={proj_tasks[1]}"]
    code, _, err = run_cli(capsys, "merge", "--base", tmp / "proj", "--tasks", *tasks, "--out", out)
    assert code == 0, err
    assert "load the output with CLIPVisionModel" not in err
    assert keys_of(out) == keys_of(tmp / "proj")
    model, info = transformers.CLIPVisionModelWithProjection.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(wemoe.load(out)(images()), model.eval()(pixel_values=images()).image_embeds, atol=1e-5, rtol=0)


def test_full_clip_model_folder_as_base_with_bare_tasks(folders, capsys):
    tmp, bare_tasks, _ = folders
    text = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=HEADS, num_hidden_layers=1, vocab_size=64, max_position_embeddings=8)
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision_config().to_dict(), text_config=text, projection_dim=EMBED))
    base = tmp / "clip"
    bare = transformers.CLIPVisionModel.from_pretrained(tmp / "bare")
    clip.vision_model.load_state_dict(getattr(bare, "vision_model", bare).state_dict())  # the tasks' pretrained weights
    clip.save_pretrained(base)
    out = tmp / "clip_ta"
    code, _, err = run_cli(capsys, "merge", "--base", base, "--tasks", *[f"t{i}={p}" for i, p in enumerate(bare_tasks)], "--out", out)
    assert code == 0, err
    assert "image tower only" in err and "taken from the base unchanged" in err
    model, info = transformers.CLIPVisionModelWithProjection.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(wemoe.load(out)(images()), model.eval()(pixel_values=images()).image_embeds, atol=1e-5, rtol=0)


def test_wemoe_merge_and_export_of_a_bare_base(folders, capsys):
    tmp, bare_tasks, _ = folders
    data = image_folder(tmp / "data", ["a", "b"], per_class=2)
    heads = {}
    for i in range(2):
        heads[f"t{i}"] = write(tmp / "heads" / f"t{i}.safetensors", {"weight": torch.randn(2, WIDTH)})
    out = tmp / "moe"
    args = ["--tasks", *[f"t{i}={p}" for i, p in enumerate(bare_tasks)], "--heads", *[f"{k}={v}" for k, v in heads.items()]]
    args += ["--data", f"t0={data}", f"t1={data}", "--steps", "1", "--batch-size", "2", "--method", "wemoe"]
    code, _, err = run_cli(capsys, "merge", "--base", tmp / "bare", *args, "--out", out, "-q")
    assert code == 0, err
    exported = tmp / "moe_export"
    code, _, err = run_cli(capsys, "export", out, "--task", "t1", "--out", exported, "-q")
    assert code == 0, err
    assert keys_of(exported) == keys_of(tmp / "bare")
    model, info = transformers.CLIPVisionModel.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info
