"""Hostile values: images that only fail when decoded, bad option values (exit 2), wrong
Python API types, CLIP sources, torchrun's environment, and results wemoe could not read back.

Every case ends in one line from wemoe's own error type, before any compute, with
nothing written; usage errors exit 2.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import wemoe
from wemoe.errors import UsageError, WemoeError
from wemoe.io.safetensors_io import load_tensors, save_tensors

from cli_helpers import assert_one_line_error, run_cli
from clip_factories import image_folder, write_clip
from factories import EMBED, IMAGE, zoo

CLASSES = 2


@pytest.fixture(scope="module")
def v(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_values")
    base, tasks, _, _ = zoo(tmp, tasks=2)
    head = tmp / "head.safetensors"
    save_tensors(head, {"weight": torch.randn(CLASSES, EMBED), "bias": torch.zeros(CLASSES)})
    rng = np.random.default_rng(0)
    data = tmp / "data.npz"
    np.savez(data, x=rng.integers(0, 256, (8, IMAGE, IMAGE, 3), dtype=np.uint8), y=np.arange(8) % CLASSES)
    image = rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
    names = [f"a={tasks[0]}", f"b={tasks[1]}"]
    adaptive = ["--method", "wemoe", "--heads", f"a={head}", f"b={head}"]
    return SimpleNamespace(tmp=tmp, base=base, tasks=tasks, names=names, head=head, data=data, image=image, adaptive=adaptive, n=0)


def nothing_written(v, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in v.tmp.iterdir() if ".wemoe-tmp-" in p.name]


def merge(capsys, v, *args):
    v.n += 1
    out = v.tmp / f"never{v.n:03d}"
    rc, _, err = run_cli(capsys, "merge", "--base", v.base, "--tasks", *v.names, "--out", out, *args)
    return rc, err, out


# --------------------------------------------------------------------------- images that fail only when decoded


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_corrupt_data(array: np.ndarray) -> bytes:
    """A PNG whose chunks all carry valid checksums but whose image data is too short for its rows."""
    h, w = array.shape[:2]
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + _chunk(b"IEND", b"")


def _png_of_size(w: int, h: int) -> bytes:
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def _bad_images(v) -> dict[str, tuple[str, bytes]]:
    jpeg = _encoded(v.image, "JPEG")
    return {
        "truncated_jpeg": ("a.jpg", jpeg[:-20]),  # the scan cut short: only decoding notices
        "corrupt_png_data": ("a.png", _png_with_corrupt_data(v.image)),
        "zero_sized_png": ("a.png", _png_of_size(0, 0)),
        "zero_width_png": ("a.png", _png_of_size(0, 8)),
        "truncated_png": ("a.png", _encoded(v.image, "PNG")[:-30]),
    }


def _folder_with(v, name: str, filename: str, content: bytes) -> Path:
    root = v.tmp / f"images_{name}"
    good = _encoded(v.image, "PNG")
    for c in range(CLASSES):
        (root / str(c)).mkdir(parents=True)
        (root / str(c) / "good.png").write_bytes(good)
    (root / "1" / filename).write_bytes(content)
    return root


@pytest.mark.parametrize("case", ["truncated_jpeg", "corrupt_png_data", "zero_sized_png", "zero_width_png", "truncated_png"])
def test_images_are_decoded_before_any_compute(v, capsys, case):
    filename, content = _bad_images(v)[case]
    folder = _folder_with(v, case, filename, content)
    bad = str(folder / "1" / filename)
    # a dry run reads every image the run would use
    rc, err, out = merge(capsys, v, *v.adaptive, "--data", f"a={folder}", f"b={v.data}", "--dry-run")
    assert_one_line_error(rc, err, bad)
    rc, err, out = merge(capsys, v, *v.adaptive, "--data", f"a={folder}", f"b={v.data}", "--steps", "1")
    assert_one_line_error(rc, err, bad)
    nothing_written(v, out)
    report = v.tmp / "never.json"
    rc, stdout, err = run_cli(capsys, "eval", v.base, "--task", f"a={v.head}:{folder}", "--json", report)
    assert_one_line_error(rc, err, bad)
    assert stdout == "" and not report.exists()


def test_empty_image_arrays(v, capsys):
    for shape in ((4, 0, 0, 3), (4, 0, 8, 3), (4, 8, 0), (0, 8, 8, 3)):
        path = v.tmp / f"empty_{'x'.join(map(str, shape))}.npz"
        np.savez(path, x=np.zeros(shape, np.uint8), y=np.zeros(shape[0], np.int64))
        rc, err, out = merge(capsys, v, *v.adaptive, "--data", f"a={path}", f"b={v.data}", "--dry-run")
        assert_one_line_error(rc, err, path.name)
        rc, _, err = run_cli(capsys, "eval", v.base, "--task", f"a={v.head}:{path}")
        assert_one_line_error(rc, err, path.name)


# --------------------------------------------------------------------------- usage errors exit 2


USAGE = {
    "router": (["--method", "wemoe", "--router", "nope"], "--router"),
    "objective": (["--method", "wemoe", "--objective", "nope"], "--objective"),
    "granularity": (["--method", "adamerging", "--granularity", "nope"], "--granularity"),
    "experts": (["--method", "wemoe", "--experts", "nope"], "--experts"),
    "coef_guard": (["--method", "wemoe", "--coef-guard", "nope"], "--coef-guard"),
    "lambda_nan": (["--lambda", "nan"], "--lambda"),
    "steps_negative": (["--method", "wemoe", "--steps", "-1"], "--steps"),
    "lr_zero": (["--method", "wemoe", "--lr", "0"], "--lr"),
    "moe_blocks_past_depth": (["--method", "wemoe", "--moe-blocks", "9"], "--moe-blocks"),
    "expert_rank_past_width": (["--method", "wemoe", "--expert-rank", "100000"], "--expert-rank"),
    "shard_size_text": (["--shard-size", "lots"], "size"),
    "shard_size_inf": (["--shard-size", "infGB"], "size"),
    "shard_size_nan": (["--shard-size", "nanMB"], "size"),
    "seed_huge": (["--seed", str(10**30)], "seed"),
    "seed_negative": (["--seed", "-1"], "seed"),
    "batch_size_huge": (["--method", "wemoe", "--batch-size", str(10**14)], "--batch-size"),
    "router_hidden_huge": (["--method", "wemoe", "--router", "task", "--router-hidden", str(10**11)], "--router-hidden"),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_bad_option_values_exit_2(v, capsys, case):
    args, fragment = USAGE[case]
    extra = (
        ["--heads", f"a={v.head}", f"b={v.head}", "--data", f"a={v.data}", f"b={v.data}"]
        if args[:2] in (["--method", "wemoe"], ["--method", "adamerging"])
        else []
    )
    rc, err, out = merge(capsys, v, *args, *extra, "--dry-run")
    assert rc == 2, err
    assert_one_line_error(rc, err, fragment)
    assert "internal error" not in err
    nothing_written(v, out)


def test_bad_task_values_of_eval_and_export_exit_2(v, capsys):
    for spec, fragment in (("=:x.npz", "empty task name"), ("a=:", "names no data"), ("a=clip:x", "clip:")):
        rc, _, err = run_cli(capsys, "eval", v.base, "--task", spec)
        assert rc == 2, err
        assert_one_line_error(rc, err, fragment)


# --------------------------------------------------------------------------- the Python API's types


API_CASES = {
    "tasks_int": ({"tasks": 42}, "checkpoints must be"),
    "tasks_none_entry": ({"tasks": [None]}, "None"),
    "tasks_int_name": ({"tasks": {1: "x"}}, "task names"),
    "tasks_path_int": ({"tasks": {"a": 5}}, "path"),
    "heads_int": ({"heads": 42}, "heads must be"),
    "data_int": ({"data": 3.5, "method": "wemoe"}, "data"),
    "config_int": ({"config": 123}, "config must be a path"),
    "base_int": ({"base": 42}, "base must be a path"),
    "out_int": ({"out": 42}, "out must be a path"),
    "arch_int": ({"arch": 3}, "arch must be a path"),
    "device_tpu": ({"device": "tpu"}, "device"),
    "device_int": ({"device": 0}, "device"),
    "dtype_int": ({"dtype": 3}, "dtype"),
    "method_int": ({"method": 3}, "method"),
    "seed_text": ({"seed": "1"}, "seed"),
    "seed_float": ({"seed": 1.5}, "seed"),
    "seed_bool": ({"seed": True}, "seed"),
    "force_text": ({"force": "no"}, "force"),
    "quiet_list": ({"quiet": []}, "quiet"),
    "dry_run_int": ({"dry_run": 1}, "dry_run"),
    "lambda_text": ({"lam": "x"}, "lambda"),
    "lambda_list": ({"lam": [[1] * 10] * 10}, "lambda"),
    "shard_size_list": ({"shard_size": [1]}, "size"),
    "unknown_param": ({"bogus": 1}, "bogus"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_refuses_wrong_types_with_its_own_error(v, case):
    given, fragment = API_CASES[case]
    kwargs = {"base": v.base, "tasks": {"a": v.tasks[0], "b": v.tasks[1]}, "out": v.tmp / f"api_{case}", "quiet": True, **given}
    config = kwargs.pop("config", None)
    with pytest.raises(WemoeError) as info:
        wemoe.merge(config, **kwargs)
    assert fragment in str(info.value), str(info.value)
    assert len(str(info.value)) < 400
    assert not (v.tmp / f"api_{case}").exists()
    assert isinstance(info.value, UsageError)  # what the CLI would exit 2 for


# --------------------------------------------------------------------------- CLIP sources


def test_clip_sources_that_would_give_unreadable_heads(v, capsys):
    _, oc_path, _ = write_clip(v.tmp / "clip")
    classes = image_folder(v.tmp / "clip_classes", ["circle", "square"])
    tensors, meta = load_tensors(oc_path)
    for name, scale, fragment in (("huge_scale", 100.0, "logit_scale"), ("inf_scale", float("inf"), "logit_scale")):
        bad = v.tmp / f"clip_{name}.safetensors"
        save_tensors(bad, {**tensors, "logit_scale": torch.tensor(scale)}, meta)
        out = v.tmp / f"heads_{name}"
        rc, _, err = run_cli(capsys, "heads", "--clip", bad, "--task", f"shapes={classes}", "--out", out, "-q")
        assert_one_line_error(rc, err, bad.name, fragment)
        assert not out.exists()
        rc, err, out = merge(capsys, v, "--heads", f"clip:{bad}")
        assert_one_line_error(rc, err, bad.name)
        nothing_written(v, out)
    # the classes folder and the CLIP checkpoint are inputs: heads never write over them
    for out in (classes, oc_path.parent):
        rc, _, err = run_cli(capsys, "heads", "--clip", oc_path, "--task", f"shapes={classes}", "--out", out, "--force", "-q")
        assert_one_line_error(rc, err, "input")
    assert (classes / "circle").is_dir() and oc_path.is_file()


# --------------------------------------------------------------------------- torchrun's environment


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "-3", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "7"}, "RANK=7"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK"),
    ],
)
def test_torchrun_environment(v, capsys, monkeypatch, env, fragment):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc, err, out = merge(capsys, v, *v.adaptive, "--data", f"a={v.data}", f"b={v.data}", "--steps", "1")
    assert_one_line_error(rc, err, fragment)
    nothing_written(v, out)


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-1", "soon"])
def test_dist_timeout_values(monkeypatch, value):
    from wemoe.adaptation.distributed import timeout_seconds

    monkeypatch.setenv("WEMOE_DIST_TIMEOUT", value)
    with pytest.raises(WemoeError, match="WEMOE_DIST_TIMEOUT"):
        timeout_seconds()


# --------------------------------------------------------------------------- results wemoe could not read back


@pytest.mark.parametrize("method", ["wemoe", "adamerging"])
def test_diverged_adaptation_writes_nothing(v, capsys, method):
    rc, err, out = merge(
        capsys, v, "--method", method, "--heads", f"a={v.head}", f"b={v.head}", "--data", f"a={v.data}", f"b={v.data}", "--lr", "1e308", "--steps", "1", "-q"
    )
    assert_one_line_error(rc, err, "NaN or Inf", "nothing was written")
    nothing_written(v, out)


# --------------------------------------------------------------------------- JSON inside input files


DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_or_mistyped_json_in_inputs(v, capsys):
    """--arch files, a Hugging Face folder's config.json, a safetensors header and its metadata: one line each, never a RecursionError."""
    import json
    import shutil
    import struct

    def arch_file(name: str, text: str) -> Path:
        p = v.tmp / f"arch_{name}.json"
        p.write_text(text)
        return p

    cases = [
        (["--arch", arch_file("deep", DEEP)], "nested too deeply"),
        (["--arch", arch_file("mean", json.dumps({"mean": "grey"}))], "mean"),
        (["--arch", arch_file("std", json.dumps({"std": [1, 0, 1]}))], "std"),
        (["--arch", arch_file("eps", json.dumps({"layer_norm_eps": "small"}))], "layer_norm_eps"),
        (["--arch", arch_file("not_utf8", "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"))], "arch_not_utf8.json"),
    ]
    for args, fragment in cases:
        rc, err, out = merge(capsys, v, *args, "--dry-run")
        assert_one_line_error(rc, err, fragment)
    hf = v.tmp / "hf_deep"
    hf.mkdir()
    shutil.copy(v.base, hf / "model.safetensors")
    (hf / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    rc, _, err = run_cli(capsys, "merge", "--base", hf, "--tasks", *v.names, "--out", v.tmp / "never_hf", "--dry-run")
    assert_one_line_error(rc, err, "config.json", "nested too deeply")
    header = DEEP.encode()
    deep_header = v.tmp / "deep_header.safetensors"
    deep_header.write_bytes(struct.pack("<Q", len(header)) + header)
    rc, err, out = merge(capsys, v, "--tasks", f"c={deep_header}", "--dry-run")
    assert_one_line_error(rc, err, "deep_header.safetensors", "not valid JSON")
    tensors, meta = load_tensors(v.tasks[0])
    for name, text in (("list", "[1]"), ("text", '"ViT"'), ("deep", DEEP[:20_000] + DEEP[-20_000:])):
        p = v.tmp / f"meta_arch_{name}.safetensors"
        save_tensors(p, tensors, {**meta, "architecture": text})
        rc, _, err = run_cli(capsys, "merge", "--base", v.base, "--tasks", f"a={p}", "--out", v.tmp / "never_meta", "--dry-run", "-q")
        assert rc == 0, err  # architecture metadata that is not a JSON object is no hint, as text that is not JSON never was


def test_class_names_and_templates_are_bounded(v, capsys):
    """A 10 MB class name would only cost the tokenizer minutes: CLIP reads 77 tokens, so names and templates are capped."""
    _, oc_path, _ = write_clip(v.tmp / "clip_bounded")
    long_name = v.tmp / "classes_long.txt"
    long_name.write_text("cat\n" + "x" * 2_000_000 + "\n")
    out = v.tmp / "heads_long"
    rc, _, err = run_cli(capsys, "heads", "--clip", oc_path, "--task", f"shapes={long_name}", "--out", out, "-q")
    assert_one_line_error(rc, err, "classes_long.txt", "class 2", "characters")
    assert len(err) < 2500 and not out.exists()
    classes = v.tmp / "classes_ok.txt"
    classes.write_text("cat\ndog\n")
    templates = v.tmp / "templates_long.txt"
    templates.write_text("a photo of {}" + "!" * 5000 + "\n")
    rc, _, err = run_cli(capsys, "heads", "--clip", oc_path, "--task", f"shapes={classes}", "--templates", templates, "--out", out, "-q")
    assert_one_line_error(rc, err, "templates_long.txt", "characters")
    assert not out.exists()
