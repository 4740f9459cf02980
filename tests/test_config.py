"""One YAML config drives both `merge --config` and `eval --config`; flags override it."""

import json

import numpy as np
import torch
import yaml

from wemoe.io.safetensors_io import save_tensors

from cli_helpers import assert_one_line_error, run_cli
from factories import zoo


def test_yaml_config_for_merge_and_eval_with_overrides(tmp_path, capsys):
    base, tasks, _, _ = zoo(tmp_path / "ck", tasks=2)
    rng = np.random.default_rng(0)
    spec = {}
    for i, p in enumerate(tasks):
        save_tensors(tmp_path / "ck" / f"h{i}.safetensors", {"weight": torch.randn(4, 16)})
        np.savez(tmp_path / "ck" / f"d{i}.npz", x_test=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 4, 20))
        spec[f"task{i}"] = {"checkpoint": f"ck/{p.name}", "head": f"ck/h{i}.safetensors", "data": f"ck/d{i}.npz"}
    cfg = {"base": f"ck/{base.name}", "method": "task-arithmetic", "lambda": 0.25, "out": "merged", "tasks": spec, "eval": {"batch_size": 7}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(
        capsys,
        "merge",
        "--config",
        tmp_path / "run.yaml",
        "--lambda",
        "0.5",
        "--heads",
        *[f"task{i}={tmp_path / 'ck' / f'h{i}.safetensors'}" for i in range(2)],
        "-q",
    )
    assert code == 0, err
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["parameters"]["lambda"] == 0.5 and written["tasks"] == ["task0", "task1"] and written["heads"] == ["task0", "task1"]
    code, out, err = run_cli(capsys, "eval", "--config", tmp_path / "run.yaml", "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) >= {"task0", "task1", "average"} and res["task0"]["n"] == 20


def test_bad_configs(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n")
    code, _, err = run_cli(capsys, "merge", "--config", tmp_path / "bad.yaml")
    assert_one_line_error(code, err, "bad.yaml", "invalid YAML")
    (tmp_path / "unknown.yaml").write_text("base: x\nlamda: 0.3\n")
    code, _, err = run_cli(capsys, "merge", "--config", tmp_path / "unknown.yaml")
    assert_one_line_error(code, err, "unknown.yaml", "lamda")


def test_shipped_example_configs_parse():
    from pathlib import Path

    for path in Path(__file__).parents[1].glob("configs/*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        assert {"base", "method", "tasks"} <= set(cfg), path
