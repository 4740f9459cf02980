"""``--router-augment augmix``: the task router is fitted on each image and one seeded AugMix view of it
(torchvision's AugMix without the operations common corruptions share)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import wemoe
from wemoe.moe.routers import ROUTERS
from wemoe.moe.routers.augment import augmenter, augmix_views

from cli_helpers import assert_one_line_error, merge_cli
from factories import tinted_tasks


def test_augmix_views_are_seeded_keep_shapes_and_change_the_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    views = augmix_views()
    a, b, c = views(images, 7), views(images, 7), views(images, 8)
    assert a.dtype == np.uint8 and a.shape == images.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, images)
    ragged = [images[0], images[1, :16, :20]]
    out = views(ragged, 3)
    assert isinstance(out, list) and [v.shape for v in out] == [(24, 24, 3), (16, 20, 3)]
    assert augmenter("none") is None


def test_augmix_uses_no_operation_that_overlaps_common_corruptions():
    from torchvision.transforms import AugMix

    ops = set(AugMix(all_ops=False)._augmentation_space(10, (32, 32)))
    assert not ops & {"Brightness", "Color", "Contrast", "Sharpness"}


def test_record_names_the_augmentation_only_when_used():
    plain = ROUTERS.get("task")()
    assert "augment" not in plain.record()
    augmented = ROUTERS.get("task")(ROUTERS.get("task").Options(augment="augmix"))
    assert augmented.record()["augment"] == "augmix"
    assert ROUTERS.from_record("task", augmented.record()) == augmented and ROUTERS.from_record("task", plain.record()) == plain


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("augment")
    return tmp, *tinted_tasks(tmp, tasks=3)


def test_augmented_fit_sees_each_image_twice_and_still_names_the_task(setup, capsys):
    tmp, base, tasks, heads, data = setup
    out = tmp / "augmented"
    common = ["--experts", "mlp", "--expert-rank", "4", "--router", "task", "--router-images", "40", "--router-epochs", "20", "--split", "train"]
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", out, *common, "--router-augment", "augmix", "--steps", "0", heads=heads, data=data)
    assert code == 0, err
    fit = json.loads((out / "config.json").read_text())["wemoe"]
    assert fit["router_options"]["augment"] == "augmix" and fit["router_fit"]["images"] == 2 * 3 * 40
    model = wemoe.load(out)
    from wemoe.data import load_data, preprocess

    for t in range(3):
        images = preprocess(load_data(data[f"t{t}"], "test").arrays, model.arch)
        with torch.no_grad():
            assert (model.routing(images)[0].argmax(-1) == t).float().mean() > 0.9
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", *common, "--router-augment", "cutout", heads=heads, data=data)
    assert_one_line_error(code, err, "--router-augment must be one of none, augmix")
