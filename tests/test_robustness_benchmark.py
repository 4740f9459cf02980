"""The robustness benchmark's corruptions and report (the run itself is `python -m benchmarks.robustness`)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.robustness import METHODS, markdown, mean_drop
from benchmarks.robustness.corruptions import CORRUPTIONS, corrupt


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(3)
    x = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    x[:, 7:22, 9:24] = rng.integers(0, 256, size=(8, 1, 1, 3), dtype=np.uint8)  # a coloured square on black
    return x


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_seeded_keeps_shape_and_changes_images(images, name):
    a, b = corrupt(name, images, 7), corrupt(name, images, 7)
    assert a.shape == images.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    changed = np.abs(a.astype(int) - images.astype(int)).mean(axis=(1, 2, 3))
    assert (changed > 0.3).all(), changed  # every image visibly altered
    assert changed.mean() < 60  # and not erased


def test_random_corruptions_depend_on_the_seed(images):
    for name in ("gaussian_noise", "impulse_noise", "spatter"):
        assert not np.array_equal(corrupt(name, images, 1), corrupt(name, images, 2)), name


def test_corruptions_do_what_their_names_say(images):
    c = corrupt("contrast", images, 0).astype(float)
    assert np.allclose(c.mean(axis=(1, 2, 3)), images.astype(float).mean(axis=(1, 2, 3)), atol=0.6)
    assert np.allclose(c.std(axis=(1, 2, 3)), 0.4 * images.astype(float).std(axis=(1, 2, 3)), atol=0.6)
    p = corrupt("pixelate", images, 0)
    assert np.array_equal(p[:, ::2, ::2], p[:, 1::2, 1::2])  # 2x2 blocks of one colour
    flat = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    assert np.array_equal(corrupt("motion_blur", flat, 0), flat)  # blur leaves a flat image flat
    i = corrupt("impulse_noise", flat, 0)
    assert set(np.unique(i)) <= {0, 128, 255} and 0.01 < (i != 128).mean() < 0.05


def report(drops: dict[str, float]) -> dict:
    rows = []
    for m in drops:
        rows.append({"method": m, "corruption": "clean", "average": 0.9})
        rows += [{"method": m, "corruption": c, "average": 0.9 - drops[m]} for c in CORRUPTIONS]
    return {"rows": rows, "corruptions": list(CORRUPTIONS), "machine": "test", "seconds": 1.0}


def test_report_states_the_goal_against_the_individual_models():
    drops = {"individual": 0.10, "task-arithmetic": 0.2, "adamerging": 0.2, "wemoe-paper": 0.2, "recommended": 0.11}
    r = report(drops)
    assert mean_drop(r, "recommended") == pytest.approx(0.11)
    assert "11.0 against 10.0, met" in markdown(r)
    drops["recommended"] = 0.15
    assert "15.0 against 10.0, missed by 3.00 points" in markdown(report(drops))


def test_report_judges_the_augmix_row_too_and_reads_reports_without_it():
    drops = {"individual": 0.10, "task-arithmetic": 0.2, "adamerging": 0.2, "wemoe-paper": 0.2, "recommended": 0.15}
    assert "AugMix" not in markdown(report(drops))  # a report of an earlier run, without the opt-in row
    drops["recommended-augmix"] = 0.115
    md = markdown(report(drops))
    assert "15.0 against 10.0, missed by 3.00 points" in md
    assert "(`--router-augment augmix`, opt-in): 11.5 against 10.0, met; clean accuracy +0.0 points" in md
    assert "recommended-augmix" in METHODS and "--router-augment" in METHODS["recommended-augmix"][1]
