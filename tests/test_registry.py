"""The method registry generates the CLI, YAML keys, dry-run plan and config.json
parameters: a method defined in a test-local module shows up in all of them."""

import json

import pytest
import torch
import yaml

from wemoe.io.safetensors_io import load_tensors

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from factories import zoo


@pytest.fixture
def toy():
    from wemoe.methods import REGISTRY

    import toy_method  # registers "scaled-mean" on first import

    REGISTRY["scaled-mean"] = toy_method.ScaledMean
    yield toy_method
    REGISTRY.pop("scaled-mean", None)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    base, tasks, base_state, states = zoo(tmp, tasks=2)
    return tmp, base, tasks, base_state, states


def test_toy_method_in_cli_help_and_choices(toy, capsys):
    code, out, _ = run_cli(capsys, "merge", "--help")
    assert code == 0
    assert "scaled-mean" in out and "--alpha" in out and "scale of the mean task vector" in out
    # a key two methods declare gets one flag whose help names both defaults
    assert "(ties, scaled-mean) [ties: 20.0; scaled-mean: 10.0]" in " ".join(out.split())


def test_toy_method_merges_and_records_parameters(toy, ckpts, capsys):
    tmp, base, tasks, base_state, states = ckpts
    out = tmp / "toy-cli"
    code, _, err = merge_cli(capsys, base, tasks, "scaled-mean", out, "--alpha", "0.75")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "scaled-mean" and cfg["parameters"] == {"alpha": 0.75, "ties_k": 10.0}
    merged, meta = load_tensors(out / "model.safetensors")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    ref = base_state[key] + 0.75 * sum(s[key] - base_state[key] for s in states) / len(states)
    assert torch.allclose(merged[key], ref, atol=1e-6)
    assert json.loads(meta["parameters"]) == {"alpha": 0.75, "ties_k": 10.0}


def test_toy_method_from_yaml_and_dry_run(toy, ckpts, capsys):
    tmp, base, tasks, _, _ = ckpts
    cfg = {
        "base": str(base),
        "method": "scaled-mean",
        "alpha": 1.25,
        "out": str(tmp / "toy-yaml"),
        "tasks": {f"t{i}": {"checkpoint": str(p)} for i, p in enumerate(tasks)},
    }
    (tmp / "toy.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(capsys, "merge", "--config", tmp / "toy.yaml", "--dry-run", "-q")
    assert code == 0, err
    assert "method:  scaled-mean (alpha=1.25, ties_k=10.0)" in out and not (tmp / "toy-yaml").exists()
    code, _, err = run_cli(capsys, "merge", "--config", tmp / "toy.yaml", "-q")
    assert code == 0, err
    assert json.loads((tmp / "toy-yaml" / "config.json").read_text())["parameters"]["alpha"] == 1.25


def test_option_of_another_method_is_refused_in_one_place(toy, ckpts, capsys):
    tmp, base, tasks, _, _ = ckpts
    args = ["merge", "--base", base, "--tasks", *map(str, tasks), "--out", tmp / "never", "-q"]
    code, _, err = run_cli(capsys, *args, "--method", "task-arithmetic", "--alpha", "0.5")
    assert_one_line_error(code, err, "--alpha only applies to --method scaled-mean")
    assert code == 2
    code, _, err = run_cli(capsys, *args, "--method", "scaled-mean", "--alpha", "3")
    assert_one_line_error(code, err, "--alpha must be <= 2")
    code, _, err = run_cli(capsys, *args, "--method", "scaled-mean", "--lambda", "0.3")
    assert_one_line_error(code, err, "--lambda only applies to --method task-arithmetic, ties, adamerging, wemoe")
    cfg = {"base": str(base), "method": "task-arithmetic", "alpha": 0.5, "tasks": {"a": {"checkpoint": str(tasks[0])}}}
    (tmp / "other.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(capsys, "merge", "--config", tmp / "other.yaml", "--out", tmp / "never", "-q")
    assert_one_line_error(code, err, "'alpha' in other.yaml only applies to --method scaled-mean")
    assert not (tmp / "never").exists()


def test_registering_a_conflicting_parameter_type_fails():
    from dataclasses import dataclass

    from wemoe.methods import MergeMethod, param, register

    class Bad(MergeMethod):
        name = "bad-types"

        @dataclass(frozen=True)
        class Params:
            steps: str = param("x", "a string where every other method has an integer")

    with pytest.raises(TypeError, match="steps"):
        register(Bad)
