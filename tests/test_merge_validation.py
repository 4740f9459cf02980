"""Every refusal of `wemoe merge` is one line naming the file (and tensor), exits
non-zero, and leaves no output directory behind."""

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from factories import write, zoo


@pytest.fixture
def setup(tmp_path):
    base_path, task_paths, base, states = zoo(tmp_path, tasks=2)
    return tmp_path, base_path, task_paths, base, states


def merge(capsys, tmp_path, base_path, tasks, *extra):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", "--base", base_path, "--tasks", *tasks, "--out", out, *extra)
    return code, err, out


def test_missing_tensor(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    bad = dict(states[0])
    bad.pop("visual.transformer.resblocks.1.attn.in_proj_weight")
    p = write(tmp / "bad.safetensors", bad)
    code, err, out = merge(capsys, tmp, base_path, [p, tasks[1]])
    assert_one_line_error(code, err, "bad.safetensors", "resblocks.1.attn.in_proj_weight", "missing")
    assert not out.exists()


def test_extra_tensor(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    bad = dict(states[0], **{"visual.transformer.resblocks.2.ln_1.weight": torch.ones(64)})
    p = write(tmp / "deeper.safetensors", bad)
    code, err, out = merge(capsys, tmp, base_path, [p])
    assert code != 0 and "deeper.safetensors" in err and not out.exists()


def test_shape_mismatch_names_tensor(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    bad = dict(states[0])
    bad["visual.transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(128, 64)
    bad["visual.transformer.resblocks.0.mlp.c_fc.bias"] = torch.zeros(128)
    bad["visual.transformer.resblocks.0.mlp.c_proj.weight"] = torch.zeros(64, 128)
    p = write(tmp / "narrow.safetensors", bad)
    code, err, out = merge(capsys, tmp, base_path, [p])
    assert_one_line_error(code, err, "narrow.safetensors", "mlp.c_fc", "shape")
    assert not out.exists()


def test_nan_and_inf(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    for value, word in ((float("nan"), "NaN"), (float("inf"), "Inf")):
        bad = dict(states[0])
        t = bad["visual.ln_post.weight"].clone()
        t[3] = value
        bad["visual.ln_post.weight"] = t
        p = write(tmp / f"bad_{word}.safetensors", bad)
        code, err, out = merge(capsys, tmp, base_path, [p])
        assert_one_line_error(code, err, f"bad_{word}.safetensors", "ln_post.weight", word)
        assert not out.exists()


def test_dtype_mismatch(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    p = write(tmp / "half.safetensors", {k: v.half() if v.is_floating_point() else v for k, v in states[0].items()})
    code, err, out = merge(capsys, tmp, base_path, [p])
    assert_one_line_error(code, err, "half.safetensors", "dtype")


def test_zero_tasks_and_duplicates(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    code, err, out = merge(capsys, tmp, base_path, [])
    assert_one_line_error(code, err, "no task")
    code, err, out = merge(capsys, tmp, base_path, [f"a={tasks[0]}", f"b={tasks[0]}"])
    assert_one_line_error(code, err, "given twice")
    code, err, out = merge(capsys, tmp, base_path, [f"a={tasks[0]}", f"a={tasks[1]}"])
    assert_one_line_error(code, err, "'a'", "twice")
    import shutil

    copy = tmp / "copy.safetensors"
    shutil.copy(tasks[0], copy)
    code, err, out = merge(capsys, tmp, base_path, [tasks[0], copy])
    assert_one_line_error(code, err, "copy.safetensors", "identical")
    assert not out.exists()


def test_different_architecture(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    from open_clip.transformer import VisionTransformer

    other = VisionTransformer(image_size=32, patch_size=8, width=96, layers=2, heads=2, mlp_ratio=4.0, output_dim=16)
    p = write(tmp / "wide.safetensors", {"visual." + k: v.contiguous() for k, v in other.state_dict().items()})
    code, err, out = merge(capsys, tmp, base_path, [p])
    assert_one_line_error(code, err, "wide.safetensors", "shape")


def test_output_rules(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    (tmp / "afile").write_text("x")
    code, _, err = run_cli(capsys, "merge", "--base", base_path, "--tasks", *tasks, "--out", tmp / "afile")
    assert_one_line_error(code, err, "afile", "is a file")
    code, err, out = merge(capsys, tmp, base_path, tasks, "-q")
    assert code == 0 and (out / "model.safetensors").exists()
    code, err, out = merge(capsys, tmp, base_path, tasks)
    assert_one_line_error(code, err, "already exists", "--force")
    before = (out / "model.safetensors").read_bytes()
    code, err, out = merge(capsys, tmp, base_path, tasks, "--lambda", "0.5", "--force", "-q")
    assert code == 0 and (out / "model.safetensors").read_bytes() != before
    leftovers = [p.name for p in tmp.iterdir() if "tmp" in p.name]
    assert leftovers == []


def test_usage_errors_exit_2(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    code, _, err = run_cli(capsys, "merge", "--base", base_path, "--tasks", *tasks, "--out", tmp / "o", "--lambda", "abc")
    assert code == 2 and "lambda" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "merge", "--base", base_path, "--tasks", *tasks, "--out", tmp / "o", "--method", "magic")
    assert code == 2 and "magic" in err
    code, _, err = run_cli(capsys, "merge", "--base", base_path, "--tasks", *tasks, "--out", tmp / "o", "--arch", "ViT-Q-99")
    assert_one_line_error(code, err, "unknown architecture", "ViT-Q-99")
    assert not (tmp / "o").exists()


def test_dry_run_prints_plan_and_writes_nothing(setup, capsys):
    tmp, base_path, tasks, base, states = setup
    code, out_text, err = run_cli(capsys, "merge", "--base", base_path, "--tasks", *tasks, "--out", tmp / "o", "--dry-run", "-q")
    assert code == 0 and "plan" in out_text and "task0" in out_text and not (tmp / "o").exists()
