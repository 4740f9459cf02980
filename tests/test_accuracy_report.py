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
