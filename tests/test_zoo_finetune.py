"""The zoo's fine-tuning: the replay term keeps features on pretraining images, and is inert when off."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
import torch.nn.functional as F  # noqa: E402

from benchmarks.zoo import datasets, replay  # noqa: E402
from benchmarks.zoo.finetune import finetune  # noqa: E402
from benchmarks.zoo.heads import balanced_subset, features, fit_prototypes  # noqa: E402
from benchmarks.zoo.model import load_encoder  # noqa: E402
from benchmarks.zoo.pretrain import BASE_PATH  # noqa: E402

CFG = {"steps": 12, "batch": 16, "lr": 1e-3, "warmup": 2, "weight_decay": 0.0, "max_shift": 1, "replay_batch": 16}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    base = load_encoder(BASE_PATH)
    d = datasets.build_task("digits8", 200, 20, seed=0)
    idx = balanced_subset(d["y_train"], 10, 0)
    w = fit_prototypes(base, d["x_train"][idx], d["y_train"][idx], 10, 30.0)
    xr = replay.render(replay.base_recipe(BASE_PATH), 300, seed=5)
    return base, w, d, xr


def test_replay_set_is_deterministic_pretraining_images() -> None:
    rec = replay.base_recipe(BASE_PATH)
    assert rec["data"]["font_pool"] == "pretrain"
    a, b = replay.render(rec, 40, seed=3), replay.render(rec, 40, seed=3)
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, replay.render(rec, 40, seed=4))


def test_replay_off_is_the_plain_fine_tune(setup) -> None:
    base, w, d, xr = setup
    plain = finetune(base, w, d["x_train"], d["y_train"], CFG, seed=1, progress=False)
    off = finetune(base, w, d["x_train"], d["y_train"], {**CFG, "replay_alpha": 0.0}, seed=1, progress=False, replay=xr)
    for (k, a), b in zip(plain.state_dict().items(), off.state_dict().values()):
        assert torch.equal(a, b), k


def test_replay_term_keeps_features_on_pretraining_images(setup) -> None:
    base, w, d, xr = setup
    fit, held = xr[:200], xr[200:]
    ref = F.normalize(features(base, held), dim=-1)

    def drift(alpha: float) -> float:
        m = finetune(base, w, d["x_train"], d["y_train"], {**CFG, "replay_alpha": alpha}, seed=1, progress=False, replay=fit)
        return float((F.normalize(features(m, held), dim=-1) - ref).pow(2).sum(1).mean())

    free, kept = drift(0.0), drift(20.0)
    assert free > 0
    assert kept < 0.5 * free, (kept, free)


def test_interference_rows_obey_their_definitions(setup) -> None:
    from benchmarks.zoo.interference import ALL_BUT_OWN, interference
    from benchmarks.zoo.quickeval import BuiltZoo

    base, w, d, _ = setup
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    head = (w, None, {})
    test = (d["x_train"][:60], d["y_train"][:60])
    zoo = BuiltZoo(model=load_encoder(BASE_PATH), base=sd, own={"a": moved, "b": sd}, tests={"a": test, "b": test}, heads={"a": head, "b": head})
    rows = interference(zoo, ["a", "b"], lam=1.0)
    # b's vector is zero: it changes nothing, and it is all that "all others" adds for task a
    assert rows["b"] == {"a": 0.0, "b": 0.0}
    assert rows[ALL_BUT_OWN]["a"] == 0.0
    # for task b, "all others" is a's vector alone
    assert rows[ALL_BUT_OWN]["b"] == rows["a"]["b"]
    assert rows["a"]["a"] == zoo.score(moved, "a") - zoo.score(sd, "a") != 0.0
