"""The accuracy report states the zoo recipe it was measured on, read from the run's JSON."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("matplotlib")
from benchmarks.accuracy import markdown
from benchmarks.zoo import config


def report(zoo: dict | None) -> dict:
    row = {"per_task": {"a": 0.5, "b": 0.75}, "average": 0.625}
    return {
        "tasks": ["a", "b"],
        "quick": False,
        "seconds": 1.0,
        "zoo": zoo,
        "methods": {"pretrained": row, "individual": {"per_task": {"a": 1.0, "b": 0.5}, "average": 0.75}},
    }


def test_recipe_line_names_the_fine_tuning_and_replay() -> None:
    md = markdown(report(config.recipe()))
    line = next(x for x in md.splitlines() if x.startswith("- Zoo recipe"))
    assert "400 steps of 32 images" in line
    assert "plus 8 pretraining-distribution replay images per step at alpha 1" in line
    assert "| individual fine-tuned | 100.0 | 50.0 | **75.0** |" in md


def test_recipe_line_without_replay_and_without_recipe() -> None:
    plain = copy.deepcopy(config.recipe())
    plain["finetune"]["replay_alpha"] = 0.0
    assert "replay" not in markdown(report(plain))
    assert "Zoo recipe" not in markdown(report(None))


def test_guard_line_reads_each_rows_guard_from_its_arguments() -> None:
    from benchmarks.accuracy.rows import EXTENDED_WEMOE, PAPER

    r = report(None)
    for key, (text, flags), average in (
        ("wemoe", PAPER, 0.70),
        ("wemoe-straight-through", EXTENDED_WEMOE["wemoe-straight-through"], 0.71),
        ("wemoe-block-routers", EXTENDED_WEMOE["wemoe-block-routers"], 0.80),
        ("wemoe-block-routers-clamp", EXTENDED_WEMOE["wemoe-block-routers-clamp"], 0.60),
    ):
        r["methods"][key] = {"per_task": {"a": average, "b": average}, "average": average, "label": text, "args": [str(f) for f in flags]}
        r["methods"][key].update(steps=100, seconds=1.0, initial_loss=1.0, final_loss=0.5, objective="task", warnings=[])
    line = next(x for x in markdown(r).splitlines() if x.startswith("- Coefficient guard"))
    assert "wemoe 70.0 (clamp) vs 71.0 (straight-through)" in line
    assert "wemoe-block-routers 80.0 (straight-through) vs 60.0 (clamp)" in line


def test_recommended_config_file_is_the_recommended_row() -> None:
    """configs/zoo_wemoe.yaml is documented as the recommended row: every flag of that row has its YAML key."""
    import yaml

    from benchmarks.accuracy.rows import BEST
    from benchmarks.common import REPO

    cfg = yaml.safe_load((REPO / "configs" / "zoo_wemoe.yaml").read_text())
    flags = [str(f) for f in BEST[1]]
    pairs = dict(zip(flags[0::2], flags[1::2]))
    assert all(k.startswith("--") for k in pairs)
    for flag, value in pairs.items():
        key = flag[2:].replace("-", "_")
        assert key in cfg, key
        assert str(cfg[key]) == value or float(cfg[key]) == float(value), (key, cfg[key], value)
