"""wemoe.io.safe_pickle: pickled checkpoints are read without executing them."""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import pickle
import random
import struct
import subprocess
import sys
import tarfile
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from wemoe.errors import WemoeError
from wemoe.io import restricted_unpickler
from wemoe.io.safe_pickle import PickledCheckpoint, load_pickled_checkpoint

FAKE_MODULE = "src.modeling"  # the task_vectors package name; never importable here


# --------------------------------------------------------------------------- look-alikes of the real classes


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))


class VisionTower(nn.Module):
    """Shaped like open_clip's VisionTransformer (same parameter names)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.image_size = (8, 8)
        self.output_dim = 4
        self.conv1 = nn.Conv2d(3, width, kernel_size=4, stride=4, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(5, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([ResidualBlock(width)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, 4))
        self.register_parameter("unused", None)
        self.register_buffer("attn_mask", torch.ones(5, 5), persistent=False)
        self.register_buffer("step", torch.tensor(7, dtype=torch.int64))
        self.register_buffer("half_scale", torch.randn(3).to(torch.bfloat16))
        self.register_buffer("transposed", torch.arange(6.0).reshape(2, 3).t())  # non-contiguous view


class CLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = VisionTower()
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.token_embedding = nn.Embedding(10, 8)


class Compose:
    """Stands in for a torchvision preprocessing pipeline stored on the encoder."""

    def __init__(self, size: int):
        self.size = size
        self.transforms = ["resize", "center_crop"]


class ImageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = CLIP()
        self.train_preprocess = Compose(224)
        self.val_preprocess = Compose(224)
        self.cache_dir = None


class ClassificationHead(nn.Linear):
    def __init__(self, normalize: bool, weights: torch.Tensor, biases: torch.Tensor | None = None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(biases.clone() if biases is not None else torch.zeros(output_size))


FAKE_CLASSES = (ResidualBlock, VisionTower, CLIP, Compose, ImageEncoder, ClassificationHead)
for _cls in FAKE_CLASSES:
    _cls.__module__ = FAKE_MODULE


@contextlib.contextmanager
def fake_src_package():
    """Make ``src.modeling`` importable only while pickling; gone again before any load."""
    src = types.ModuleType("src")
    modeling = types.ModuleType(FAKE_MODULE)
    for cls in FAKE_CLASSES:
        setattr(modeling, cls.__qualname__, cls)
    src.modeling = modeling
    saved = {name: sys.modules.get(name) for name in ("src", FAKE_MODULE)}
    sys.modules["src"], sys.modules[FAKE_MODULE] = src, modeling
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def save_module(obj: object, path: Path, **kwargs) -> Path:
    with fake_src_package(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # legacy format: "Couldn't retrieve source code"
        torch.save(obj, path, **kwargs)
    assert "src" not in sys.modules and FAKE_MODULE not in sys.modules
    return path


def assert_same_tensors(loaded: PickledCheckpoint, expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded.state_dict) == list(expected)
    for key, tensor in expected.items():
        got = loaded.state_dict[key]
        assert type(got) is torch.Tensor, key
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert torch.equal(got, tensor), key
        assert not got.requires_grad, key


# --------------------------------------------------------------------------- whole pickled modules


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_image_encoder_module_recovers_state_dict(tmp_path, zip_format):
    torch.manual_seed(0)
    encoder = ImageEncoder()
    path = save_module(encoder, tmp_path / "finetuned.pt", _use_new_zipfile_serialization=zip_format)
    # torch's own safe loader refuses it, which is why the restricted path exists.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)

    loaded = load_pickled_checkpoint(path)

    expected = encoder.state_dict()
    assert "model.visual.attn_mask" not in expected  # non-persistent buffer
    assert "model.visual.conv1.weight" in expected
    assert_same_tensors(loaded, expected)
    assert loaded.method == "restricted"
    assert loaded.root_type == "src.modeling.ImageEncoder"
    assert loaded.attributes["model.visual.output_dim"] == 4
    assert loaded.attributes["model.visual.image_size"] == (8, 8)
    assert loaded.attributes["cache_dir"] is None
    assert "src.modeling.CLIP" in loaded.inert_globals
    assert "torch.nn.modules.activation.MultiheadAttention" in loaded.inert_globals
    assert loaded.skipped == ()
    assert "src" not in sys.modules and FAKE_MODULE not in sys.modules  # nothing was imported


@pytest.mark.parametrize("normalize", [True, False])
def test_classification_head_recovers_weights_and_normalize(tmp_path, normalize):
    head = ClassificationHead(normalize, torch.randn(5, 8), torch.randn(5))
    path = save_module(head, tmp_path / "head_MNIST.pt")

    loaded = load_pickled_checkpoint(path)

    assert_same_tensors(loaded, head.state_dict())
    assert loaded.attributes["normalize"] is normalize
    assert loaded.attributes["in_features"] == 8 and loaded.attributes["out_features"] == 5
    assert loaded.root_type == "src.modeling.ClassificationHead"


def test_module_nested_in_dict(tmp_path):
    head = ClassificationHead(True, torch.randn(3, 4))
    path = save_module({"head": head, "epoch": 2}, tmp_path / "ckpt.pt")
    loaded = load_pickled_checkpoint(path)
    assert_same_tensors(loaded, {f"head.{k}": v for k, v in head.state_dict().items()})
    assert loaded.attributes == {"head.normalize": True, "head.in_features": 4, "head.out_features": 3, "epoch": 2}
    assert loaded.root_type is None


# --------------------------------------------------------------------------- plain state dicts (weights_only path)


def test_bare_state_dict_uses_weights_only(tmp_path):
    sd = ImageEncoder().state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    loaded = load_pickled_checkpoint(tmp_path / "sd.pt")
    assert loaded.method == "weights_only"
    assert_same_tensors(loaded, sd)
    assert loaded.inert_globals == ()


def test_state_dict_key_and_parameters(tmp_path):
    lin = nn.Linear(3, 2)
    sd = lin.state_dict(keep_vars=True)  # nn.Parameter values
    torch.save({"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    loaded = load_pickled_checkpoint(tmp_path / "ckpt.pt")
    assert_same_tensors(loaded, lin.state_dict())
    assert loaded.attributes == {"epoch": 3}


def test_no_tensors_is_refused(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(WemoeError, match="no tensors"):
        load_pickled_checkpoint(tmp_path / "meta.pt")
    path = save_module(Compose(3), tmp_path / "compose.pt")
    with pytest.raises(WemoeError, match="no tensors") as info:
        load_pickled_checkpoint(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- hostile pickles


class Payload:
    """Unpickling this runs ``func(*args)`` in a normal unpickler."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def payloads(marker: Path) -> list[Payload]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return [
        Payload(os.system, f"touch '{marker}'"),
        Payload(builtins.exec, touch),
        Payload(builtins.eval, f"__import__('os').system(\"touch '{marker}'\")"),
        Payload(subprocess.call, ["touch", str(marker)]),
        Payload(builtins.__import__, "antigravity"),
    ]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("index", range(5), ids=["os.system", "exec", "eval", "subprocess", "__import__"])
def test_code_in_torch_save_never_runs(tmp_path, zip_format, index):
    marker = tmp_path / "pwned"
    weight = torch.randn(3, 3)
    path = tmp_path / "evil.pt"
    torch.save({"weight": weight, "evil": payloads(marker)[index]}, path, _use_new_zipfile_serialization=zip_format)

    loaded = load_pickled_checkpoint(path)

    assert not marker.exists()
    assert_same_tensors(loaded, {"weight": weight})
    assert loaded.inert_globals  # the callable was answered with an inert stand-in
    assert "antigravity" not in sys.modules


def test_payload_is_live_under_an_ordinary_unpickler(tmp_path):
    """Guards the test above: the same file does run code when loaded the unsafe way."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(1), "evil": Payload(os.system, f"touch '{marker}'")}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_module_state_with_payloads_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    head = ClassificationHead(True, torch.randn(2, 3))
    head.hook = Payload(os.system, f"touch '{marker}'")  # a plain attribute holding a payload
    head.register_buffer("bad", None)
    path = save_module(head, tmp_path / "head.pt")
    loaded = load_pickled_checkpoint(path)
    assert not marker.exists()
    assert_same_tensors(loaded, {"weight": head.weight.detach(), "bias": head.bias.detach()})
    assert "posix.system" in loaded.inert_globals or "nt.system" in loaded.inert_globals


@pytest.mark.parametrize("index", range(5))
def test_raw_pickle_payload_is_refused(tmp_path, index):
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"weight": torch.ones(2), "evil": payloads(marker)[index]}, protocol=2))
    with pytest.raises(WemoeError) as info:
        load_pickled_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_protocol0_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "p0.pt"
    path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(WemoeError, match="unrecognised"):
        load_pickled_checkpoint(path)
    assert not marker.exists()


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


def test_build_cannot_set_attributes_on_allowed_globals(tmp_path):
    """A hand-written BUILD targeting an allow-listed function is ignored."""
    weight = torch.randn(4)
    torch.save({"weight": weight}, tmp_path / "plain.pt")

    def setattr_ops(global_: bytes, name: str) -> bytes:
        # GLOBAL; BUILD with state (None, {name: (1, 2, 3)}), i.e. setattr(global, name, (1, 2, 3)); POP
        encoded = name.encode()
        return b"c" + global_ + b"N}X" + struct.pack("<I", len(encoded)) + encoded + b"(K\x01K\x02K\x03ts\x86b0"

    prefix = b"\x80\x02" + setattr_ops(b"torch._utils\n_rebuild_tensor_v2\n", "__defaults__") + setattr_ops(b"torch\nUntypedStorage\n", "nbytes")
    _rewrite_zip(tmp_path / "plain.pt", tmp_path / "crafted.pt", lambda name, data: prefix + data if name.endswith("/data.pkl") else data)
    defaults = restricted_unpickler._rebuild_tensor_v2.__defaults__
    storage_nbytes = torch.UntypedStorage.nbytes

    loaded = load_pickled_checkpoint(tmp_path / "crafted.pt")

    assert loaded.method == "restricted"
    assert_same_tensors(loaded, {"weight": weight})
    assert restricted_unpickler._rebuild_tensor_v2.__defaults__ == defaults
    assert torch.UntypedStorage.nbytes is storage_nbytes


def test_tensor_past_end_of_storage_is_refused():
    storage = torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(16), dtype=torch.float32, _internal=True)
    with pytest.raises(pickle.UnpicklingError, match="past the end"):
        restricted_unpickler._rebuild_tensor_v2(storage, 0, (100,), (1,), False, None)
    assert restricted_unpickler._rebuild_tensor_v2(storage, 1, (3,), (1,)).shape == (3,)


# --------------------------------------------------------------------------- broken and foreign files


def _module_file(tmp_path: Path, zip_format: bool = True) -> Path:
    return save_module(ClassificationHead(True, torch.randn(64, 64)), tmp_path / "head.pt", _use_new_zipfile_serialization=zip_format)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.95])
def test_truncated_file(tmp_path, zip_format, fraction):
    data = _module_file(tmp_path, zip_format).read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(WemoeError) as info:
        load_pickled_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("first", [b"", b"PK\x03\x04", b"\x80\x02"], ids=["random", "zip-magic", "pickle-magic"])
def test_random_bytes(tmp_path, first):
    path = tmp_path / "random.pt"
    path.write_bytes(first + random.Random(0).randbytes(4096))
    with pytest.raises(WemoeError) as info:
        load_pickled_checkpoint(path)
    assert str(path) in str(info.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(WemoeError, match="empty") as info:
        load_pickled_checkpoint(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(WemoeError, match="no such file"):
        load_pickled_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(WemoeError, match="not a regular file"):
        load_pickled_checkpoint(tmp_path)


def test_torchscript_archive_is_refused(tmp_path):
    _rewrite_zip(_module_file(tmp_path), tmp_path / "scripted.pt", lambda name, data: data)
    with zipfile.ZipFile(tmp_path / "scripted.pt", "a") as z:
        prefix = z.namelist()[0].split("/")[0]
        z.writestr(f"{prefix}/constants.pkl", b"\x80\x02).")
    with pytest.raises(WemoeError, match="TorchScript"):
        load_pickled_checkpoint(tmp_path / "scripted.pt")


def test_zip_without_data_pkl_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(WemoeError, match="data.pkl"):
        load_pickled_checkpoint(tmp_path / "other.zip")


def test_tar_format_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        data = pickle.dumps({"a": 1})
        info = tarfile.TarInfo("pickle")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(WemoeError, match="tar"):
        load_pickled_checkpoint(path)
