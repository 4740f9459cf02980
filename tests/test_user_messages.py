"""What a new user is told: which paths were written, what dtype will be written, and errors that point
the right way (a name given twice, a task of another architecture, a model without heads, every option's help)."""

from __future__ import annotations

import click
import pytest
import torch

import wemoe
from wemoe.cli import main as cli_main

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from clip_factories import two_tasks_on_a_folder
from factories import HEADS, WIDTH, write, zoo


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A small WEMoE output with heads, adapted for one step on a tiny image folder."""
    tmp = tmp_path_factory.mktemp("messages")
    base, tasks, data, heads = two_tasks_on_a_folder(tmp)
    out = tmp / "moe"
    try:
        cli_main(
            [
                "merge",
                "--base",
                str(base),
                "--tasks",
                *[f"t{i}={p}" for i, p in enumerate(tasks)],
                "--method",
                "wemoe",
                "--heads",
                *[f"{k}={v}" for k, v in heads.items()],
                "--data",
                f"t0={data}",
                f"t1={data}",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--out",
                str(out),
                "-q",
            ]
        )
    except SystemExit as exc:
        assert not exc.code
    return tmp, base, tasks, data, out, heads


def test_routes_png_and_json_and_eval_card_print_what_they_wrote(moe, capsys):
    tmp, _, _, data, out, _ = moe
    png, js = tmp / "routing.png", tmp / "routing.json"
    code, _, err = run_cli(capsys, "routes", out, "--task", f"t0={data}", "--png", png, "--json", js, "-q")
    assert code == 0, err
    assert png.is_file() and f"wrote the routing heatmap to {png}" in err and f"to {js}" in err
    code, _, err = run_cli(capsys, "eval", out, "--task", f"t0=:{data}", "--card", "--json", tmp / "eval.json", "-q")
    assert code == 0, err
    assert f"{out / 'README.md'}" in err and f"wrote the results to {tmp / 'eval.json'}" in err


def test_dry_run_states_the_dtype_written(moe, capsys):
    tmp, base, tasks, data, _, heads = moe
    code, plan, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--dry-run", data=[data, data], heads=heads)
    assert code == 0, err
    assert "dtype:   float32 (float32 unless --dtype)" in plan and "as base" not in plan
    code, plan, err = merge_cli(capsys, base, tasks, "task-arithmetic", tmp / "never", "--dry-run")
    assert code == 0, err
    assert "dtype:   float32 (the base's)" in plan
    code, plan, err = merge_cli(capsys, base, tasks, "task-arithmetic", tmp / "never", "--dry-run", "--dtype", "bfloat16")
    assert code == 0, err
    assert "dtype:   bfloat16" in plan


def test_a_folder_and_a_file_giving_the_same_task_name(tmp_path, capsys):
    base, tasks, _, states = zoo(tmp_path, tasks=2)
    folder = tmp_path / "mnist"
    write(folder / "model.safetensors", states[0])
    file = write(tmp_path / "mnist.safetensors", states[1])
    code, _, err = run_cli(capsys, "merge", "--base", base, "--tasks", folder, file, "--out", tmp_path / "o", "--dry-run")
    assert_one_line_error(code, err, "task 'mnist' is given twice", str(folder), str(file), "NAME=PATH")


def test_a_task_of_another_depth_or_width_says_which_architecture_each_has(tmp_path, capsys):
    base, tasks, _, _ = zoo(tmp_path, tasks=1)
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(1)
    deeper = VisionTransformer(image_size=32, patch_size=8, width=WIDTH, layers=3, heads=HEADS, mlp_ratio=4.0, output_dim=16)
    wider = VisionTransformer(image_size=32, patch_size=8, width=2 * WIDTH, layers=2, heads=HEADS, mlp_ratio=4.0, output_dim=16)
    meta = {"heads": str(HEADS), "activation": "gelu"}
    for name, model, fragments in (("deeper", deeper, ("depth 3", "depth 2")), ("wider", wider, (f"width {2 * WIDTH}", f"width {WIDTH}"))):
        path = write(tmp_path / f"{name}.safetensors", {"visual." + k: v for k, v in model.state_dict().items()}, meta)
        code, _, err = run_cli(capsys, "merge", "--base", base, "--tasks", f"a={tasks[0]}", f"b={path}", "--out", tmp_path / "o", "--dry-run")
        assert_one_line_error(code, err, str(path), *fragments, "fine-tune of the base's architecture", "first difference: tensor")


def test_logits_on_a_model_without_heads_says_it_has_no_heads(tmp_path, capsys):
    base, tasks, _, _ = zoo(tmp_path, tasks=2)
    out = tmp_path / "ta"
    code, _, err = merge_cli(capsys, base, tasks, "task-arithmetic", out)
    assert code == 0, err
    model = wemoe.load(out)
    with pytest.raises(wemoe.WemoeError, match="has no heads"):
        model.logits(torch.randn(1, 3, 32, 32), "t0")


def _options(command: click.Command, path: str):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, f"{path} {name}")
        return
    for param in command.params:
        if isinstance(param, click.Option):
            yield f"{path} {param.opts[-1]}", param


def test_every_cli_option_has_a_help_text():
    from wemoe.cli import build_cli

    missing = [name for name, option in _options(build_cli(), "wemoe") if not (option.help or "").strip()]
    assert not missing, missing
