"""Zero-shot heads from CLIP's text tower: equal to open_clip's own computation, from open_clip files and
HF CLIPModel folders alike, built on the fly by ``clip:`` sources, and bad input refused in one line."""

import json

import numpy as np
import pytest
import torch

from wemoe.clip.templates import BUILTIN
from wemoe.commands.evaluate import parse_task_spec
from wemoe.merging.config import merge_config
from wemoe.model.heads import load_head, load_heads

from cli_helpers import assert_one_line_error, run_cli
from clip_factories import META, clip_reference_head, image_folder, visual_tasks, write_clip
from factories import write

EUROSAT = ["annual crop land", "forest", "river", "sea or lake"]
SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    model, oc_path, hf_dir = write_clip(tmp)
    (tmp / "eurosat.txt").write_text("\n".join(EUROSAT) + "\n\n")
    shapes = image_folder(tmp / "shapes", SHAPES)
    return tmp, model, oc_path, hf_dir, shapes


def test_heads_equal_open_clip_encode_text(clip, capsys):
    tmp, model, oc_path, hf_dir, shapes = clip
    written = {}
    for kind, src in (("open_clip", oc_path), ("hf", hf_dir)):
        out = tmp / f"heads_{kind}"
        code, _, err = run_cli(capsys, "heads", "--clip", src, "--task", f"eurosat={tmp / 'eurosat.txt'}", f"shapes={shapes}", "--out", out)
        assert code == 0, err
        written[kind] = {name: load_head(out / f"{name}.safetensors") for name in ("eurosat", "shapes")}
    # eurosat: its published templates; shapes: no published set, so the generic (OpenAI ImageNet) one
    expected = {"eurosat": clip_reference_head(model, EUROSAT, list(BUILTIN["eurosat"])), "shapes": clip_reference_head(model, SHAPES, list(BUILTIN["openai"]))}
    for kind, heads in written.items():
        for name, head in heads.items():
            assert head.normalize and head.bias is None
            assert head.classes == (EUROSAT if name == "eurosat" else SHAPES)
            torch.testing.assert_close(head.weight, expected[name], atol=1e-5, rtol=0, msg=f"{kind} {name}")
    for name in ("eurosat", "shapes"):
        torch.testing.assert_close(written["hf"][name].weight, written["open_clip"][name].weight, atol=1e-6, rtol=0)


def test_template_file(clip, capsys):
    tmp, model, oc_path, _, _ = clip
    templates = ["a drawing of a {}.", "{} in the wild", "itap of my {}."]
    (tmp / "templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp / "heads_file_templates"
    code, _, err = run_cli(capsys, "heads", "--clip", oc_path, "--task", f"eurosat={tmp / 'eurosat.txt'}", "--templates", tmp / "templates.txt", "--out", out)
    assert code == 0, err
    head = load_head(out / "eurosat.safetensors")
    torch.testing.assert_close(head.weight, clip_reference_head(model, EUROSAT, templates), atol=1e-5, rtol=0)


def eval_json(capsys, tmp, name, model, *tasks):
    report = tmp / f"{name}.json"
    code, _, err = run_cli(capsys, "eval", model, "--task", *tasks, "--json", report, "-q")
    assert code == 0, err
    return {k: v for k, v in json.loads(report.read_text()).items() if k not in ("seconds", "model")}


def test_eval_with_clip_source_equals_eval_with_head_files(clip, capsys):
    tmp, _, oc_path, hf_dir, shapes = clip
    npz = tmp / "digits.npz"
    rng = np.random.default_rng(1)
    np.savez(npz, x=rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 3, 10), classes=np.array(["zero", "one", "two"]))
    out = tmp / "heads_eval"
    code, _, err = run_cli(capsys, "heads", "--clip", oc_path, "--task", f"shapes={shapes}", f"digits={npz}", "--out", out)
    assert code == 0, err
    from_files = eval_json(capsys, tmp, "files", oc_path, f"shapes={out / 'shapes.safetensors'}:{shapes}", f"digits={out / 'digits.safetensors'}:{npz}")
    on_the_fly = eval_json(capsys, tmp, "clip", oc_path, f"shapes=clip:{oc_path}:{shapes}", f"digits=clip:{hf_dir}:{npz}")
    assert on_the_fly == from_files
    assert from_files["shapes"]["n"] == 9 and from_files["digits"]["n"] == 10


def test_merge_with_clip_heads_stores_the_zero_shot_heads(clip, capsys):
    tmp, model, oc_path, _, shapes = clip
    tasks = visual_tasks(tmp, model.state_dict(), 2)
    other = image_folder(tmp / "other", ["a", "b"], seed=3)
    out = tmp / "wemoe_clip"
    code, _, err = run_cli(
        capsys,
        "merge",
        "--base",
        oc_path,
        "--tasks",
        f"shapes={tasks[0]}",
        f"other={tasks[1]}",
        "--method",
        "wemoe",
        "--heads",
        f"clip:{oc_path}",
        "--data",
        f"shapes={shapes}",
        f"other={other}",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        out,
        "-q",
    )
    assert code == 0, err
    heads_dir = tmp / "heads_merge"
    code, _, err = run_cli(capsys, "heads", "--clip", oc_path, "--task", f"shapes={shapes}", f"other={other}", "--out", heads_dir)
    assert code == 0, err
    stored = load_heads(out / "heads.safetensors")
    for name in ("shapes", "other"):
        written = load_head(heads_dir / f"{name}.safetensors")
        torch.testing.assert_close(stored[name].weight, written.weight, atol=0, rtol=0)
        assert stored[name].normalize and stored[name].classes == written.classes
    # a static method takes no --data, so a clip: head has no class names
    code, _, err = run_cli(capsys, "merge", "--base", oc_path, "--tasks", f"shapes={tasks[0]}", "--heads", f"shapes=clip:{oc_path}", "--out", tmp / "ta")
    assert_one_line_error(code, err, "clip: heads take the class names", "--method task-arithmetic takes no --data", "wemoe heads")


def test_task_spec_syntax():
    assert parse_task_spec("cars=h.safetensors:data/") == ("cars", "h.safetensors", "data/")
    assert parse_task_spec("cars=:data/") == ("cars", None, "data/")
    assert parse_task_spec("cars=data/") == ("cars", None, "data/")
    assert parse_task_spec("cars=clip:clip.pt:data/") == ("cars", "clip:clip.pt", "data/")
    assert parse_task_spec("clip:clip.pt:cars.npz") == ("cars", "clip:clip.pt", "cars.npz")
    cfg = merge_config(base="b", tasks=["a=x", "b=y"], method="wemoe", heads=["clip:c.pt", "b=h.safetensors"], data=["a=d/"])
    assert [t.head for t in cfg.tasks] == ["clip:c.pt", "h.safetensors"]  # the shared CLIP serves tasks given no other head


def test_yaml_clip_head_is_relative_to_the_file(tmp_path):
    (tmp_path / "merge.yaml").write_text("base: b.pt\nmethod: wemoe\ntasks:\n  a: {checkpoint: a.pt, head: 'clip:clip/model.safetensors', data: d/}\n")
    cfg = merge_config(tmp_path / "merge.yaml")
    assert cfg.tasks[0].head == f"clip:{tmp_path / 'clip/model.safetensors'}"


@pytest.mark.parametrize(
    "content,fragment",
    [("", "no class names"), ("cat\ndog\ncat\n", "class 'cat' is listed twice"), ("cat\n\ndog\n", "class 2 has an empty name")],
    ids=["empty", "duplicate", "blank-line"],
)
def test_bad_class_file(clip, capsys, content, fragment):
    tmp, _, oc_path, _, _ = clip
    path = tmp / "bad_classes.txt"
    path.write_text(content)
    code, _, err = run_cli(capsys, "heads", "--clip", oc_path, "--task", f"pets={path}", "--out", tmp / "never")
    assert_one_line_error(code, err, "bad_classes.txt", fragment)
    assert not (tmp / "never").exists()


def test_templates_without_placeholder(clip, capsys):
    tmp, _, oc_path, _, _ = clip
    (tmp / "bad_templates.txt").write_text("a photo of a {}.\na photo of a thing.\n")
    task = f"eurosat={tmp / 'eurosat.txt'}"
    code, _, err = run_cli(capsys, "heads", "--clip", oc_path, "--task", task, "--templates", tmp / "bad_templates.txt", "--out", tmp / "never")
    assert_one_line_error(code, err, "line 2 has no '{}'")
    code, _, err = run_cli(capsys, "heads", "--clip", oc_path, "--task", task, "--templates", "imagenet21k", "--out", tmp / "never")
    assert_one_line_error(code, err, "--templates must be auto")


def test_checkpoint_without_text_tower(clip, capsys):
    tmp, model, _, _, _ = clip
    image_only = write(tmp / "image_only.safetensors", {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}, META)
    code, _, err = run_cli(capsys, "heads", "--clip", image_only, "--task", f"eurosat={tmp / 'eurosat.txt'}", "--out", tmp / "never")
    assert_one_line_error(code, err, "image_only.safetensors", "no CLIP text tower")
    code, _, err = run_cli(capsys, "eval", image_only, "--task", f"eurosat=clip:{image_only}:{tmp / 'shapes'}")
    assert_one_line_error(code, err, "no CLIP text tower")


@pytest.mark.parametrize(
    "shape,fragment",
    [((128, 24), "projects to 24 dimensions but the image projection to 16"), ((96, 16), "takes 96 features but the text tower is 128 wide")],
    ids=["embed", "width"],
)
def test_text_tower_not_matching_the_image_projection(clip, capsys, shape, fragment):
    tmp, model, _, _, _ = clip
    state = dict(model.state_dict())
    state["text_projection"] = torch.randn(shape)
    bad = write(tmp / f"bad_proj_{shape[1]}.safetensors", state, META)
    code, _, err = run_cli(capsys, "heads", "--clip", bad, "--task", f"eurosat={tmp / 'eurosat.txt'}", "--out", tmp / "never")
    assert_one_line_error(code, err, bad.name, fragment)
