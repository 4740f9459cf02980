"""Hub-ready model cards: Hugging Face front matter, a load snippet that runs as pasted, and
an exported single-task model's card that says what it is and that it has a head."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from wemoe.core.arch import KNOWN_ARCHS
from wemoe.outputs.hub import hub_id, open_clip_name, timm_name

from cli_helpers import merge_cli, run_cli
from clip_factories import two_tasks_on_a_folder
from factories import hf_config, hf_state_from_open_clip, open_clip_vit, perturbed, write


def split_card(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def snippet(body: str) -> str:
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def run_snippet(body: str, where, monkeypatch) -> dict:
    """Run the card's snippet as pasted, from another working directory."""
    monkeypatch.chdir(where)
    scope: dict = {}
    exec(compile(snippet(body), "README.md", "exec"), scope)
    return scope


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    base, tasks, data, heads = two_tasks_on_a_folder(tmp)
    return tmp, base, tasks, data, heads


def test_static_merge_card_has_front_matter_and_a_snippet_that_runs(moe, capsys, monkeypatch, tmp_path):
    tmp, base, tasks, _, heads = moe
    out = tmp_path / "merged"
    code, _, err = merge_cli(capsys, base, tasks, "task-arithmetic", out, "--heads", *[f"{k}={v}" for k, v in heads.items()])
    assert code == 0, err
    meta, body = split_card((out / "README.md").read_text())
    assert meta["library_name"] == "open_clip" and meta["pipeline_tag"] == "image-feature-extraction"
    assert meta["tags"][:3] == ["model-merging", "wemoe", "task-arithmetic"] and "clip" in meta["tags"]
    assert "base_model" not in meta and "metrics" not in meta  # local inputs have no hub id; nothing measured yet
    assert "MODEL_DIR" not in body and "clip_model" not in snippet(body).replace("# use_merged_visual(clip_model", "")
    assert json.dumps(str(out)) in snippet(body)
    (tmp_path / "elsewhere").mkdir()
    scope = run_snippet(body, tmp_path / "elsewhere", monkeypatch)
    assert scope["features"].shape == (2, 16) and scope["logits"].shape == (2, 2)


def test_transformers_output_snippet_loads_with_transformers(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    base_state = hf_state_from_open_clip(open_clip_vit().state_dict())
    # a base read from the hub's cache has a hub id, and so do its tasks
    base = tmp_path / "hub" / "models--someorg--tiny-clip" / "snapshots" / "0123"
    write(base / "model.safetensors", base_state)
    (base / "config.json").write_text(json.dumps(hf_config()))
    tasks = []
    for i in range(2):
        t = tmp_path / f"task{i}"
        write(t / "model.safetensors", perturbed(base_state, 50 + i))
        (t / "config.json").write_text(json.dumps(hf_config()))
        tasks.append(t)
    out = tmp_path / "out"
    code, _, err = merge_cli(capsys, base, tasks, "ties", out)
    assert code == 0, err
    meta, body = split_card((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and meta["base_model"] == ["someorg/tiny-clip"] and "ties" in meta["tags"]
    scope = run_snippet(body, tmp_path, monkeypatch)
    assert type(scope["hf"]).__name__ == "CLIPVisionModelWithProjection"


def test_export_card_says_what_it_is_and_that_it_has_a_head(moe, capsys, tmp_path):
    tmp, base, tasks, data, heads = moe
    out = tmp_path / "moe"
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", out, "--steps", "1", "--batch-size", "2", heads=heads, data=[data, data])
    assert code == 0, err
    meta, _ = split_card((out / "README.md").read_text())
    assert meta["library_name"] == "wemoe" and "mixture-of-experts" in meta["tags"]
    exported = tmp_path / "cars_plain"
    code, _, err = run_cli(capsys, "export", out, "--task", "t1", "--out", exported, "-q")
    assert code == 0, err
    card = (exported / "README.md").read_text()
    meta, body = split_card(card)
    assert "merge of 1 task" not in body and body.lstrip().startswith("# t1: a plain ViT exported from the WEMoE model moe")
    assert "| t1 |" in body and body.split("| t1 |")[1].split("\n")[0].rstrip().endswith("| yes |")
    assert 'model.logits(images, "t1")' in body
    # measured accuracy goes into the front matter as well
    code, _, err = run_cli(capsys, "eval", exported, "--task", f"t1=:{data}", "--card", "-q")
    assert code == 0, err
    meta, body = split_card((exported / "README.md").read_text())
    assert meta["metrics"] == ["accuracy"]
    result = meta["model-index"][0]
    assert result["name"] == "cars_plain" and result["results"][0]["dataset"]["name"] == "t1"
    assert 0 <= result["results"][0]["metrics"][0]["value"] <= 100 and "| yes |" in body


def test_hub_ids_and_library_names():
    assert hub_id("/h/.cache/huggingface/hub/models--openai--clip-vit-base-patch32/snapshots/abc") == "openai/clip-vit-base-patch32"
    assert hub_id("/data/datasets--tanganke--sun397/snapshots/x/test", "datasets") == "tanganke/sun397"
    assert hub_id("merged/") is None and hub_id(None) is None
    assert open_clip_name(KNOWN_ARCHS["ViT-B-32-quickgelu"]) == "ViT-B-32-quickgelu"
    assert timm_name(KNOWN_ARCHS["vit_base_patch32_clip_quickgelu_224"]) == "vit_base_patch32_clip_quickgelu_224"
    assert open_clip_name(dict(KNOWN_ARCHS["ViT-B-32"], depth=3)) is None
