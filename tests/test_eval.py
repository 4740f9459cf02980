"""`wemoe eval`: accuracy and loss against an independent computation on real
data (scikit-learn's digits), readers, heads, batch-size independence, errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wemoe.io.safetensors_io import save_tensors

from cli_helpers import assert_one_line_error, run_cli
from factories import open_clip_vit, write

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def digits(n_train=600, n_test=300):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    return x[:n_train], d.target[:n_train], x[n_train : n_train + n_test], d.target[n_train : n_train + n_test]


def reference_features(model, x_uint8):
    x = torch.from_numpy(x_uint8).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    with torch.no_grad():
        out = model((x - CLIP_MEAN) / CLIP_STD)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaltask")
    oc = open_clip_vit(seed=3)
    model_path = write(tmp / "model.safetensors", {"visual." + k: v.contiguous() for k, v in oc.state_dict().items()}, {"heads": "2"})
    xtr, ytr, xte, yte = digits()
    feats = F.normalize(reference_features(oc, xtr), dim=-1)
    protos = torch.stack([feats[torch.from_numpy(ytr == c)].mean(0) for c in range(10)])
    weight = 30 * F.normalize(protos, dim=-1)
    head_path = tmp / "head.safetensors"
    save_tensors(head_path, {"weight": weight, "bias": torch.linspace(-0.1, 0.1, 10)}, {"normalize": "true"})
    data_path = tmp / "digits.npz"
    np.savez(data_path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=np.array([str(i) for i in range(10)]))
    logits = F.normalize(reference_features(oc, xte), dim=-1) @ weight.T + torch.linspace(-0.1, 0.1, 10)
    labels = torch.from_numpy(yte).long()
    ref = {"accuracy": int((logits.argmax(-1) == labels).sum()) / len(labels), "loss": F.cross_entropy(logits, labels).item(), "n": len(yte)}
    return tmp, model_path, head_path, data_path, ref


def test_accuracy_and_loss_match_independent_computation(task, capsys):
    tmp, model_path, head_path, data_path, ref = task
    assert 0.0 < ref["accuracy"] < 1.0  # a random-init encoder: the point is equality below
    out = tmp / "r.json"
    code, stdout, err = run_cli(capsys, "eval", model_path, "--task", f"digits={head_path}:{data_path}", "--json", out, "-q")
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["digits"]["n"] == ref["n"]
    assert res["digits"]["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)
    assert res["digits"]["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert res["average"] == res["digits"]["accuracy"]
    assert "digits" in stdout and "average" in stdout


def test_batch_size_and_limit(task, capsys):
    tmp, model_path, head_path, data_path, ref = task
    accs = []
    for bs in (1, 7, 300):
        code, _, err = run_cli(capsys, "eval", model_path, "--task", f"d={head_path}:{data_path}", "--batch-size", bs, "--json", tmp / f"b{bs}.json", "-q")
        assert code == 0, err
        accs.append(json.loads((tmp / f"b{bs}.json").read_text())["d"])
    assert accs[0]["accuracy"] == accs[1]["accuracy"] == accs[2]["accuracy"]
    assert accs[0]["loss"] == pytest.approx(accs[2]["loss"], rel=1e-5)
    code, _, err = run_cli(capsys, "eval", model_path, "--task", f"d={head_path}:{data_path}", "--limit", 50, "--json", tmp / "l.json", "-q")
    assert json.loads((tmp / "l.json").read_text())["d"]["n"] == 50


def test_image_folder_equals_npz(task, capsys):
    from PIL import Image

    tmp, model_path, head_path, data_path, ref = task
    z = np.load(data_path)
    root = tmp / "folder"
    for i, (img, y) in enumerate(zip(z["x_test"][:60], z["y_test"][:60])):
        d = root / "test" / str(y)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:04d}.png")
    for c in range(10):  # every class folder must exist for the class order to match
        (root / "test" / str(c)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(z["x_test"][0]).save(root / "test" / str(c) / "zz_extra.png")
    code, _, err = run_cli(capsys, "eval", model_path, "--task", f"d={head_path}:{root}", "--json", tmp / "f.json", "-q")
    assert code == 0, err
    from wemoe.data import load_data

    data = load_data(root)
    assert len(data) == 70 and data.classes == [str(c) for c in range(10)]
    res = json.loads((tmp / "f.json").read_text())["d"]
    assert res["n"] == 70 and 0.0 <= res["accuracy"] <= 1.0


def test_pickled_classification_head(task, capsys, tmp_path):
    tmp, model_path, head_path, data_path, ref = task
    from wemoe.model.heads import load_head

    class ClassificationHead(torch.nn.Linear):
        def __init__(self, normalize, weights, biases=None):
            out_dim, in_dim = weights.shape
            super().__init__(in_dim, out_dim)
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())
            self.bias = torch.nn.Parameter(biases.clone()) if biases is not None else torch.nn.Parameter(torch.zeros(out_dim))

    ClassificationHead.__module__ = "src.heads"
    ClassificationHead.__qualname__ = "ClassificationHead"
    import sys
    import types

    pkg, fake = types.ModuleType("src"), types.ModuleType("src.heads")
    fake.ClassificationHead = ClassificationHead
    pkg.heads = fake
    sys.modules["src"], sys.modules["src.heads"] = pkg, fake
    try:
        h = load_head(head_path)
        torch.save(ClassificationHead(True, h.weight, h.bias), tmp_path / "head_digits.pt")
    finally:
        del sys.modules["src.heads"], sys.modules["src"]
    loaded = load_head(tmp_path / "head_digits.pt")
    assert loaded.normalize is True
    assert torch.equal(loaded.weight, h.weight) and torch.equal(loaded.bias, h.bias)
    code, _, err = run_cli(capsys, "eval", model_path, "--task", f"d={tmp_path / 'head_digits.pt'}:{data_path}", "--json", tmp_path / "p.json", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "p.json").read_text())["d"]["accuracy"] == pytest.approx(ref["accuracy"])


def test_errors(task, capsys, tmp_path):
    tmp, model_path, head_path, data_path, ref = task
    save_tensors(tmp_path / "wide.safetensors", {"weight": torch.zeros(10, 32)})
    code, _, err = run_cli(capsys, "eval", model_path, "--task", f"d={tmp_path / 'wide.safetensors'}:{data_path}")
    assert_one_line_error(code, err, "wide.safetensors", "32 features", "16")
    save_tensors(tmp_path / "five.safetensors", {"weight": torch.zeros(5, 16)})
    code, _, err = run_cli(capsys, "eval", model_path, "--task", f"d={tmp_path / 'five.safetensors'}:{data_path}")
    assert_one_line_error(code, err, "digits.npz", "5 classes")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "eval", model_path, "--task", f"d={head_path}:{tmp_path / 'empty'}")
    assert_one_line_error(code, err, "empty", "no class sub-folders")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    code, _, err = run_cli(capsys, "eval", model_path, "--task", f"d={head_path}:{tmp_path / 'broken.npz'}")
    assert_one_line_error(code, err, "broken.npz")
    code, _, err = run_cli(capsys, "eval", model_path, "--task", f"nosuch=:{data_path}")
    assert_one_line_error(code, err, "unknown task 'nosuch'")
    bad = tmp_path / "withtext" / "0"
    bad.mkdir(parents=True)
    (bad / "notes.txt").write_text("hello")
    code, _, err = run_cli(capsys, "eval", model_path, "--task", f"d={head_path}:{tmp_path / 'withtext'}")
    assert_one_line_error(code, err, "notes.txt", "not an image")
