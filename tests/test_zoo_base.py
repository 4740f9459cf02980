"""The committed zoo base matches its recipe, and the zoo's data builders honour their contract."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
from safetensors import safe_open  # noqa: E402

from benchmarks.zoo import datasets  # noqa: E402
from benchmarks.zoo.model import build_vit  # noqa: E402
from benchmarks.zoo.pretrain import BASE_PATH, RECIPE_PATH  # noqa: E402

N_CLASSES = {"fashion": 10, "mnist": 10, "digits8": 10, "letters": 26, "housenum": 10, "textures": 10, "shapes": 8, "counting": 6}


@pytest.fixture(scope="module")
def recipe() -> dict:
    with open(RECIPE_PATH) as f:
        return json.load(f)


def test_base_matches_recipe(recipe: dict) -> None:
    arch = recipe["arch"]
    expected = {"visual." + k: tuple(v.shape) for k, v in build_vit(arch).state_dict().items()}
    with safe_open(BASE_PATH, framework="pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert shapes == expected
    assert dtypes == {"F32"}
    assert meta["activation"] == "gelu"
    for key in ("image_size", "patch_size", "width", "layers", "heads"):
        assert meta[key] == str(arch[key]), key
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    assert n_params == recipe["result"]["n_params"]
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in shapes
    assert shapes["visual.proj"] == (arch["width"], arch["output_dim"])
    assert os.path.getsize(BASE_PATH) <= 20 * 2**20


def test_task_registry_is_the_documented_eight() -> None:
    assert set(datasets.TASKS) == set(N_CLASSES) == set(datasets.BUILDERS)


@pytest.mark.parametrize("task", sorted(N_CLASSES))
def test_builder_contract(task: str) -> None:
    d = datasets.build_task(task, n_train=24, n_test=12, seed=0)
    assert set(d) == {"x_train", "y_train", "x_test", "y_test", "classes"}
    for split, n in (("train", 24), ("test", 12)):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert y.min() >= 0 and y.max() < N_CLASSES[task]
    assert len(d["classes"]) == N_CLASSES[task] and d["classes"].dtype.kind == "U"
    assert d["x_train"].std() > 5  # not blank


def test_rendered_builder_is_deterministic() -> None:
    a = datasets.build_task("shapes", 16, 8, seed=3)
    b = datasets.build_task("shapes", 16, 8, seed=3)
    c = datasets.build_task("shapes", 16, 8, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["x_train"], c["x_train"])


def test_broad_pretraining_kinds_are_not_task_classes() -> None:
    from benchmarks.zoo import broad

    assert not {s.lower() for s in broad.BROAD_SHAPES} & {s.lower() for s in datasets.SHAPES}
    assert not {s.lower() for s in broad.BROAD_TEXTURES} & {s.lower() for s in datasets.TEXTURES}
    sm, sk = broad.shape_bank(2, seed=0)
    tm, tk = broad.texture_bank(2, seed=0)
    assert sm.shape == (2 * len(broad.BROAD_SHAPES), 32, 32) and sm.dtype == np.uint8
    assert tm.shape == (2 * len(broad.BROAD_TEXTURES), 32, 32) and tm.dtype == np.uint8
    assert sorted(set(sk.tolist())) == list(range(len(broad.BROAD_SHAPES)))
    assert sorted(set(tk.tolist())) == list(range(len(broad.BROAD_TEXTURES)))
    # every mask draws something and leaves some ground
    for m in list(sm) + list(tm):
        assert 0.02 < (m > 127).mean() < 0.9
    np.testing.assert_array_equal(broad.shape_bank(2, seed=0)[0], sm)


def test_broad_batch_mixes_kinds_with_offset_labels() -> None:
    from benchmarks.zoo import broad
    from benchmarks.zoo.pretrain import BROAD_DEFAULT, sample_batch

    n_glyph_classes = 5
    rng = np.random.default_rng(0)
    sm, sk = broad.shape_bank(2, seed=0)
    tm, tk = broad.texture_bank(2, seed=1)
    bank = {
        "masks": rng.integers(0, 255, (20, 32, 32), dtype=np.uint8),
        "labels": np.arange(20) % n_glyph_classes,
        "shape_masks": sm,
        "shape_labels": sk + n_glyph_classes,
        "texture_masks": tm,
        "texture_labels": tk + n_glyph_classes + len(broad.BROAD_SHAPES),
    }
    d = {"rotate": 12.0, "scale": [0.7, 1.1], "shift": 0.12, "clutter": 0.5, "broad": dict(BROAD_DEFAULT)}
    x, y = sample_batch(bank, np.arange(20), 64, rng, torch.Generator().manual_seed(0), d)
    assert x.shape == (64, 32, 32, 3) and x.dtype == torch.uint8
    n_shape = n_tex = round(64 * BROAD_DEFAULT["shape_frac"])
    assert (y < n_glyph_classes).sum() == 64 - n_shape - n_tex
    assert ((y >= n_glyph_classes) & (y < n_glyph_classes + len(broad.BROAD_SHAPES))).sum() == n_shape
    assert (y >= n_glyph_classes + len(broad.BROAD_SHAPES)).sum() == n_tex


def test_ceiling_script_refuses_an_unbuilt_zoo_in_one_line(tmp_path) -> None:
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.zoo.ceiling", "--cache", str(tmp_path), "--out", str(tmp_path / "c")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: no built zoo at {tmp_path} (missing {', '.join(datasets.TASKS)}): run `python -m benchmarks.zoo build` first"
    ]
    assert not list(tmp_path.iterdir())
