"""Outputs load in the libraries their layout comes from: a static merge or export of a Hugging Face base
is a transformers model folder (its own config.json, safetensors ``format: pt``, wemoe's record in
wemoe.json), and every output carries a model card."""

import json

import pytest
import torch
from safetensors import safe_open

import wemoe
from wemoe.outputs.artifact import read_output

from cli_helpers import run_cli
from clip_factories import hf_clip_config, hf_clip_state, image_folder, open_clip_clip
from factories import IMAGE, hf_config, hf_state_from_open_clip, open_clip_vit, perturbed, write

pytest.importorskip("transformers")


def hf_folder(path, state, config):
    write(path / "model.safetensors", state)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def hf_zoo(tmp_path_factory):
    """An HF CLIPVisionModelWithProjection base, two fine-tune-like copies, and a full HF CLIPModel."""
    tmp = tmp_path_factory.mktemp("hf")
    base = hf_state_from_open_clip(open_clip_vit().state_dict())
    base_dir = hf_folder(tmp / "base", base, hf_config())
    tasks = [hf_folder(tmp / f"task{i}", perturbed(base, seed=30 + i), hf_config()) for i in range(2)]
    clip_state = {k: v.contiguous() for k, v in open_clip_clip().state_dict().items()}
    clip_dir = hf_folder(tmp / "clip", hf_clip_state(clip_state), hf_clip_config())
    clip_visual = hf_state_from_open_clip({k[len("visual.") :]: v for k, v in clip_state.items() if k.startswith("visual.")})
    clip_tasks = [hf_folder(tmp / f"clip_task{i}", perturbed(clip_visual, 40 + i), hf_config()) for i in range(2)]
    return tmp, base_dir, tasks, clip_dir, clip_tasks


def hf_embeddings(path, x):
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(path).eval()
    with torch.no_grad():
        return model(pixel_values=x).image_embeds


def images(n=4):
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


def assert_transformers_folder(out, expected_config):
    assert json.loads((out / "config.json").read_text()) == expected_config
    record = read_output(out)
    assert record is not None and record.record_file.name == "wemoe.json" and record.scheme == "hf_clip"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt" and json.loads(f.metadata()["tasks"]) == record.tasks
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(hf_embeddings(out, x), wemoe.load(out)(x), atol=1e-5, rtol=0)


def test_static_merge_of_hf_base_loads_with_transformers(hf_zoo, capsys):
    tmp, base, tasks, _, _ = hf_zoo
    out = tmp / "ta"
    code, _, err = run_cli(capsys, "merge", "--base", base, "--tasks", *[f"t{i}={p}" for i, p in enumerate(tasks)], "--lambda", "0.4", "--out", out, "-q")
    assert code == 0, err
    assert_transformers_folder(out, hf_config())  # the base's own config, unchanged
    card = (out / "README.md").read_text()
    record = read_output(out).raw
    assert "task-arithmetic" in card and record["inputs"]["tasks"]["t1"]["sha256"] in card and "CLIPVisionModelWithProjection" in card
    # the output is itself a valid base: merging it again reads its config.json as a transformers config
    code, _, err = run_cli(capsys, "merge", "--base", out, "--tasks", f"t0={tasks[0]}", "--out", tmp / "again", "-q")
    assert code == 0, err


def test_static_merge_of_full_hf_clip_keeps_the_image_part_of_its_config(hf_zoo, capsys):
    tmp, _, _, clip, clip_tasks = hf_zoo
    out = tmp / "clip_ta"
    code, _, err = run_cli(capsys, "merge", "--base", clip, "--tasks", *[f"t{i}={p}" for i, p in enumerate(clip_tasks)], "--out", out, "-q")
    assert code == 0, err
    expected = dict(hf_config(), architectures=["CLIPVisionModelWithProjection"])
    assert_transformers_folder(out, expected)


def test_wemoe_export_of_hf_base_loads_with_transformers(hf_zoo, capsys):
    tmp, base, tasks, _, _ = hf_zoo
    heads_dir = tmp / "heads"
    heads_dir.mkdir()
    data = image_folder(tmp / "data", ["a", "b"])
    for i in range(2):
        write(heads_dir / f"t{i}.safetensors", {"weight": torch.randn(2, 16)})
    out = tmp / "wemoe"
    args = ["--tasks", *[f"t{i}={p}" for i, p in enumerate(tasks)], "--heads", *[f"t{i}={heads_dir / f't{i}.safetensors'}" for i in range(2)]]
    args += ["--data", f"t0={data}", f"t1={data}", "--steps", "2", "--batch-size", "2"]
    code, _, err = run_cli(capsys, "merge", "--base", base, *args, "--method", "wemoe", "--out", out, "-q")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["format"] == "wemoe"  # a mixture of experts keeps its record in config.json
    assert "only wemoe rebuilds it" in (out / "README.md").read_text()
    exported = tmp / "export"
    code, _, err = run_cli(capsys, "export", out, "--task", "t1", "--out", exported, "-q")
    assert code == 0, err
    assert_transformers_folder(exported, hf_config())
    # eval --card records measured accuracies in the model card
    code, _, err = run_cli(capsys, "eval", exported, "--task", f"t1=:{data}", "--card", "-q")
    assert code == 0, err
    card = (exported / "README.md").read_text()
    assert "| t1 |" in card and "Not measured yet" not in card


def test_open_clip_and_timm_outputs_say_format_pt(tmp_path, capsys):
    from factories import zoo

    for kind in ("open_clip", "timm"):
        base, tasks, _, _ = zoo(tmp_path, kind=kind, tasks=2)
        out = tmp_path / f"{kind}_out"
        code, _, err = run_cli(capsys, "merge", "--base", base, "--tasks", *map(str, tasks), "--out", out, "-q")
        assert code == 0, err
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.metadata()["format"] == "pt"
        assert json.loads((out / "config.json").read_text())["format"] == "wemoe" and not (out / "wemoe.json").exists()
        assert (out / "README.md").is_file()
