"""One YAML config drives both `merge --config` and `eval --config`; flags override it."""

import json
from pathlib import Path

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


CONFIGS = Path(__file__).parents[1] / "configs"


def test_shipped_zoo_config_is_the_recommended_merge_and_dry_runs(tmp_path, capsys):
    """configs/zoo_wemoe.yaml through the real reader, then `wemoe merge --config ... --dry-run` with small
    stand-in checkpoints, heads and data placed where its relative paths point."""
    from wemoe.merging.config import eval_options_from_yaml, merge_config

    cfg = merge_config(CONFIGS / "zoo_wemoe.yaml")
    p = cfg.params
    assert cfg.method == "wemoe" and (p.experts, p.expert_rank, p.router, p.router_images, p.steps, p.split) == ("all", "16", "task", 3000, 0, "train")
    assert len(cfg.tasks) == 8 and all(t.head and t.data for t in cfg.tasks)
    root = tmp_path / "repo"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "zoo_wemoe.yaml").write_text((CONFIGS / "zoo_wemoe.yaml").read_text())
    stand_ins = tmp_path / "stand_ins"
    base, tasks, _, _ = zoo(stand_ins, tasks=len(cfg.tasks))
    rng = np.random.default_rng(0)
    for spec, task in zip(cfg.tasks, tasks):
        for want, source in ((cfg.base, base), (spec.checkpoint, task)):
            target = root / Path(want).resolve().relative_to(CONFIGS.parent.resolve())
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
        head = root / Path(spec.head).resolve().relative_to(CONFIGS.parent.resolve())
        head.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(head, {"weight": torch.randn(3, 16)})
        data = root / Path(spec.data).resolve().relative_to(CONFIGS.parent.resolve())
        data.parent.mkdir(parents=True, exist_ok=True)
        np.savez(data, x_train=rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 3, 12))
    code, out, err = run_cli(capsys, "merge", "--config", root / "configs" / "zoo_wemoe.yaml", "--dry-run", "-q")
    assert code == 0, err
    assert "method:  wemoe" in out and "expert_rank=16" in out and "router=task" in out and "routed attn,mlp + norms, embeddings, projection" in out
    assert out.count("data:    ") == 8 and not (root / "out").exists()
    opts = eval_options_from_yaml({"tasks": ()}, root / "configs" / "zoo_wemoe.yaml")
    assert opts["model"].endswith("out/zoo_wemoe") and len(opts["tasks"]) == 8


def test_shipped_clip_config_parses_and_names_the_missing_checkpoint(capsys):
    """configs/clip_vit_b32_task_arithmetic.yaml is an example over files the user holds: the real reader takes it
    whole, and a dry run without those files stops at once naming the first one."""
    from wemoe.merging.config import merge_config

    cfg = merge_config(CONFIGS / "clip_vit_b32_task_arithmetic.yaml")
    assert cfg.method == "task-arithmetic" and cfg.arch == "ViT-B-32-quickgelu" and cfg.params.lam == 0.3
    assert [t.name for t in cfg.tasks] == ["sun397", "cars"] and cfg.tasks[0].head.endswith("head_SUN397.pt")
    code, _, err = run_cli(capsys, "merge", "--config", CONFIGS / "clip_vit_b32_task_arithmetic.yaml", "--dry-run")
    assert_one_line_error(code, err, "/path/to/ViT-B-32/zeroshot.pt", "no such file")


def test_every_shipped_config_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == ["clip_vit_b32_task_arithmetic.yaml", "zoo_wemoe.yaml"]
