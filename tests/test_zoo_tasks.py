"""The zoo's twelve extra tasks honour the builder contract, and the main eight's data is unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("torch")

from benchmarks.zoo import datasets

N_CLASSES = {
    "greek": 24,
    "cyrillic": 30,
    "symbols": 24,
    "fontstyle": 12,
    "rotation": 8,
    "position": 16,
    "size": 6,
    "colour": 10,
    "stripeangle": 24,
    "clock": 12,
    "mnistorient": 8,
    "fashionclutter": 10,
}
# build_task(task, 20, 10, seed=0) of the main eight, computed with the code before the extra tasks existed
MAIN_HASHES = {
    "fashion": "18dddf24cd260a0c",
    "mnist": "3344accf493e5119",
    "digits8": "fad92037cc7a310d",
    "letters": "b144e3ab784201cf",
    "housenum": "81dc60c382a8d0ec",
    "textures": "19df2a141429e0ed",
    "shapes": "3231bfea70d66376",
    "counting": "31c4efa0b140ad55",
}
# fashionclutter keeps Fashion-MNIST's own (unbalanced) sampling; every other task is class-balanced
BALANCED = set(N_CLASSES) - {"fashionclutter"}


def split_hash(d: datasets.Split) -> str:
    h = hashlib.sha256()
    for k in ("x_train", "y_train", "x_test", "y_test", "classes"):
        a = np.ascontiguousarray(d[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def test_registry() -> None:
    from benchmarks.zoo import extra_tasks

    assert datasets.TASKS == ("fashion", "mnist", "digits8", "letters", "housenum", "textures", "shapes", "counting")
    assert datasets.EXTRA_TASKS == tuple(N_CLASSES)
    assert datasets.ALL_TASKS == datasets.TASKS + datasets.EXTRA_TASKS
    assert len(set(datasets.ALL_TASKS)) == 20
    assert tuple(extra_tasks.BUILDERS) == datasets.EXTRA_TASKS
    assert set(datasets.BUILDERS) == set(datasets.TASKS)
    with pytest.raises(KeyError, match="unknown zoo task"):
        datasets.build_task("nosuchtask", 4, 2, 0)


@pytest.mark.parametrize("task", sorted(MAIN_HASHES))
def test_main_tasks_data_unchanged(task: str) -> None:
    assert split_hash(datasets.build_task(task, 20, 10, 0)) == MAIN_HASHES[task]


@pytest.mark.parametrize("task", list(N_CLASSES))
def test_extra_task_contract(task: str) -> None:
    k = N_CLASSES[task]
    n_train = max(20, 2 * k)  # enough for every class of a balanced task to appear
    d = datasets.build_task(task, n_train, 10, seed=0)
    assert set(d) == {"x_train", "y_train", "x_test", "y_test", "classes"}
    for split, n in (("train", n_train), ("test", 10)):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert y.min() >= 0 and y.max() < k
    assert len(d["classes"]) == k and len(set(d["classes"].tolist())) == k and d["classes"].dtype.kind == "U"
    if task in BALANCED:
        assert np.array_equal(np.unique(d["y_train"]), np.arange(k))
    assert d["x_train"].std() > 5  # not blank
    assert not np.array_equal(d["x_train"][:10], d["x_test"])
    again = datasets.build_task(task, n_train, 10, seed=0)
    assert all(np.array_equal(d[key], again[key]) for key in d)
    other = datasets.build_task(task, n_train, 10, seed=1)
    assert not np.array_equal(d["x_train"], other["x_train"])
    assert not np.array_equal(d["x_test"], other["x_test"])
