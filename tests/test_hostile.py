"""Hostile and broken inputs: every one is refused before any output appears,
with one line naming the file (and tensor) at fault, a non-zero exit code, no
traceback (unless ``--debug``) and no output directory left behind.

The inputs are tiny and built once per module; every case runs the real CLI
entry point in-process.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wemoe.cli import main
from wemoe.errors import WemoeError
from wemoe.io.safetensors_io import save_tensors

from cli_helpers import assert_one_line_error, run_cli
from factories import DEPTH, EMBED, HEADS, IMAGE, PATCH, WIDTH, write, zoo

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CLASSES = 4


# --------------------------------------------------------------------------- raw safetensors surgery


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def raw_safetensors(header: bytes | dict | list, data: bytes, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


@pytest.fixture(scope="module")
def z(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    base, tasks, base_state, states = zoo(tmp, tasks=2)
    rng = np.random.default_rng(0)
    head = tmp / "head.safetensors"
    save_tensors(head, {"weight": torch.randn(CLASSES, EMBED), "bias": torch.zeros(CLASSES)})
    x = rng.integers(0, 256, (8, IMAGE, IMAGE, 3), dtype=np.uint8)
    y = np.arange(8) % CLASSES
    data = tmp / "data.npz"
    np.savez(data, x=x, y=y)
    from PIL import Image

    folder = tmp / "folder"
    for c in range(CLASSES):
        (folder / str(c)).mkdir(parents=True)
        Image.fromarray(x[c]).save(folder / str(c) / "a.png")
    return SimpleNamespace(
        tmp=tmp,
        base=base,
        tasks=tasks,
        base_state=base_state,
        states=states,
        head=head,
        data=data,
        folder=folder,
        x=x,
        y=y,
        header=split_safetensors(tasks[0]),
        n=0,
    )


def fresh(z, name: str) -> Path:
    """A new directory for one case's broken files."""
    z.n += 1
    d = z.tmp / f"case{z.n:03d}_{name}"
    d.mkdir()
    return d


def merge_refused(capsys, z, tasks, *fragments, base=None, extra=(), code=None) -> str:
    z.n += 1
    out = z.tmp / f"never{z.n:03d}"
    rc, _, err = run_cli(capsys, "merge", "--base", base or z.base, "--tasks", *tasks, "--out", out, *extra)
    if code is not None:
        assert rc == code, err
    assert_one_line_error(rc, err, *fragments)
    assert not out.exists(), "a refused merge left an output directory"
    assert not [p for p in z.tmp.iterdir() if ".wemoe-tmp-" in p.name], "a refused merge left a temporary directory"
    return err


def eval_refused(capsys, z, task_spec, *fragments, model=None, extra=()) -> str:
    report = z.tmp / "never.json"
    rc, stdout, err = run_cli(capsys, "eval", model or z.base, "--task", task_spec, "--json", report, *extra)
    assert_one_line_error(rc, err, *fragments)
    assert stdout == "" and not report.exists()
    return err


# --------------------------------------------------------------------------- corrupted safetensors files

TASK_KEY = "visual.transformer.resblocks.0.mlp.c_fc.weight"


def _cut_header(z, d):
    p = d / "cut_header.safetensors"
    p.write_bytes(z.tasks[0].read_bytes()[:5])
    return p, ("cut_header.safetensors", "shorter than")


def _cut_in_header(z, d):
    p = d / "cut_in_header.safetensors"
    p.write_bytes(z.tasks[0].read_bytes()[:200])
    return p, ("cut_in_header.safetensors", "header length exceeds")


def _cut_data(z, d):
    p = d / "cut_data.safetensors"
    raw = z.tasks[0].read_bytes()
    p.write_bytes(raw[: len(raw) - 1000])
    return p, ("cut_data.safetensors", "header lies")


def _garbage_json(z, d):
    p = d / "garbage.safetensors"
    p.write_bytes(raw_safetensors(b'{"visual.conv1.weight": {"dtype": "F32", "sha', b"\0" * 64))
    return p, ("garbage.safetensors", "not valid JSON")


def _not_utf8(z, d):
    p = d / "binary_header.safetensors"
    p.write_bytes(raw_safetensors(b"\xff\xfe\x00\x81" * 8, b""))
    return p, ("binary_header.safetensors", "not valid JSON")


def _json_list(z, d):
    p = d / "list.safetensors"
    p.write_bytes(raw_safetensors([1, 2, 3], b""))
    return p, ("list.safetensors", "not a JSON object")


def _random_bytes(z, d):
    p = d / "noise.safetensors"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p, ("noise.safetensors", "header length exceeds")


def _empty_file(z, d):
    p = d / "empty.safetensors"
    p.write_bytes(b"")
    return p, ("empty.safetensors",)


def _lie(mutate, name):
    def make(z, d):
        header, data = json.loads(json.dumps(z.header[0])), z.header[1]
        fragments = mutate(header)
        p = d / f"{name}.safetensors"
        p.write_bytes(raw_safetensors(header, data))
        return p, (f"{name}.safetensors", *fragments)

    return make


def _lie_size(h):
    h[TASK_KEY]["shape"] = [h[TASK_KEY]["shape"][0] * 2, h[TASK_KEY]["shape"][1]]
    return (TASK_KEY, "header lies")


def _lie_offset(h):
    s, e = h[TASK_KEY]["data_offsets"]
    h[TASK_KEY]["data_offsets"] = [s + 10**9, e + 10**9]
    return (TASK_KEY, "header lies")


def _lie_negative_offset(h):
    s, e = h[TASK_KEY]["data_offsets"]
    h[TASK_KEY]["data_offsets"] = [-8, e - s - 8]
    return (TASK_KEY,)


def _lie_overlap(h):
    other = "visual.transformer.resblocks.0.mlp.c_proj.weight"  # same byte size as c_fc.weight
    h[other]["data_offsets"] = list(h[TASK_KEY]["data_offsets"])
    return ("same bytes",)


def _lie_negative_dim(h):
    h[TASK_KEY]["shape"] = [-256, -64]
    return (TASK_KEY, "negative")


def _lie_huge_dim(h):
    h[TASK_KEY]["shape"] = [2**62, 2**62, 2**62]
    return (TASK_KEY, "header lies")


def _lie_float_dim(h):
    h[TASK_KEY]["shape"] = [256.5, 64]
    return (TASK_KEY, "corrupted")


def _lie_dtype(h):
    h[TASK_KEY]["dtype"] = "F128"
    return (TASK_KEY, "corrupted")


def _lie_entry(h):
    h[TASK_KEY] = "not an entry"
    return (TASK_KEY, "corrupted")


def _lie_metadata(h):
    h["__metadata__"] = {"heads": 2}
    return ("__metadata__",)


CORRUPT = {
    "cut_header": _cut_header,
    "cut_in_header": _cut_in_header,
    "cut_data": _cut_data,
    "garbage_json": _garbage_json,
    "not_utf8": _not_utf8,
    "json_list": _json_list,
    "random_bytes": _random_bytes,
    "empty_file": _empty_file,
    "lie_size": _lie(_lie_size, "lie_size"),
    "lie_offset": _lie(_lie_offset, "lie_offset"),
    "lie_negative_offset": _lie(_lie_negative_offset, "lie_negative_offset"),
    "lie_overlap": _lie(_lie_overlap, "lie_overlap"),
    "lie_negative_dim": _lie(_lie_negative_dim, "lie_negative_dim"),
    "lie_huge_dim": _lie(_lie_huge_dim, "lie_huge_dim"),
    "lie_float_dim": _lie(_lie_float_dim, "lie_float_dim"),
    "lie_dtype": _lie(_lie_dtype, "lie_dtype"),
    "lie_entry": _lie(_lie_entry, "lie_entry"),
    "lie_metadata": _lie(_lie_metadata, "lie_metadata"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupted_safetensors_as_task(z, capsys, case):
    path, fragments = CORRUPT[case](z, fresh(z, case))
    merge_refused(capsys, z, [str(path), str(z.tasks[1])], *fragments)


@pytest.mark.parametrize("case", ["cut_data", "garbage_json", "lie_overlap"])
def test_corrupted_safetensors_as_base_head_and_eval_model(z, capsys, case):
    path, fragments = CORRUPT[case](z, fresh(z, case))
    merge_refused(capsys, z, [str(t) for t in z.tasks], *fragments, base=path)
    eval_refused(capsys, z, f"t={path}:{z.data}", *fragments)
    eval_refused(capsys, z, f"t={z.head}:{z.data}", *fragments, model=path)


# --------------------------------------------------------------------------- pickles that would run code


class _Command:
    """Unpickling this with plain pickle runs ``touch marker``."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "subprocess":
            return (subprocess.call, (["touch", str(self.marker)],))
        if self.how == "exec":
            import builtins

            return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))
        return (os.system, (f"touch {self.marker}",))


def _evil_files(d: Path) -> list[tuple[Path, Path]]:
    """The same trap in a torch zip archive, a legacy torch file and a bare pickle."""
    out = []
    for i, (how, container) in enumerate((("system", "zip"), ("subprocess", "zip"), ("exec", "legacy"), ("system", "bare"))):
        marker = d / f"pwned{i}"
        trap = _Command(marker, how)
        p = d / f"evil{i}.pt"
        payload = {"weight": torch.zeros(CLASSES, EMBED), "visual.conv1.weight": torch.zeros(1), "trap": trap}
        if container == "zip":
            torch.save(payload, p)
        elif container == "legacy":
            torch.save(payload, p, _use_new_zipfile_serialization=False)
        else:
            p.write_bytes(pickle.dumps(trap, protocol=2))
        out.append((p, marker))
    return out


def test_malicious_pickle_is_never_executed(z, capsys):
    d = fresh(z, "pickle")
    files = _evil_files(d)
    for p, marker in files:
        merge_refused(capsys, z, [str(p), str(z.tasks[1])], p.name)
        merge_refused(capsys, z, [str(t) for t in z.tasks], p.name, base=p)
        merge_refused(capsys, z, [f"a={z.tasks[0]}", f"b={z.tasks[1]}"], p.name, extra=("--heads", f"a={p}"))
        eval_refused(capsys, z, f"t={p}:{z.data}", p.name)
        assert not marker.exists(), f"{p.name}: the pickle ran its command"
    assert not list(d.glob("pwned*"))


# --------------------------------------------------------------------------- checkpoints that do not fit the base


def _state(z, edit, name: str) -> Path:
    s = dict(z.states[0])
    edit(s)
    return write(z.tmp / f"{name}.safetensors", s, {"heads": str(HEADS), "activation": "gelu"})


def test_different_width_depth_and_patch(z, capsys):
    from open_clip.transformer import VisionTransformer

    def other(**kw):
        args = {"image_size": IMAGE, "patch_size": PATCH, "width": WIDTH, "layers": DEPTH, "heads": HEADS, "mlp_ratio": 4.0, "output_dim": EMBED} | kw
        torch.manual_seed(1)
        return {"visual." + k: v.contiguous() for k, v in VisionTransformer(**args).state_dict().items()}

    wide = write(z.tmp / "wide.safetensors", other(width=96), {"heads": str(HEADS)})
    merge_refused(capsys, z, [str(wide)], "wide.safetensors", "shape")
    deep = write(z.tmp / "deep.safetensors", other(layers=DEPTH + 1), {"heads": str(HEADS)})
    merge_refused(capsys, z, [str(deep)], "deep.safetensors", "resblocks.2", "not in the base")
    shallow = write(z.tmp / "shallow.safetensors", other(layers=DEPTH - 1), {"heads": str(HEADS)})
    merge_refused(capsys, z, [str(shallow)], "shallow.safetensors", "resblocks.1", "missing")
    patch = write(z.tmp / "patch16.safetensors", other(patch_size=16, image_size=64), {"heads": str(HEADS)})
    merge_refused(capsys, z, [str(patch)], "patch16.safetensors", "conv1.weight", "shape")
    heads4 = write(z.tmp / "heads4.safetensors", z.states[0], {"heads": "4", "activation": "gelu"})
    merge_refused(capsys, z, [str(heads4)], "heads4.safetensors", "heads")
    quick = write(z.tmp / "quick.safetensors", z.states[0], {"heads": str(HEADS), "activation": "quick_gelu"})
    merge_refused(capsys, z, [str(quick)], "quick.safetensors", "activation")


def test_missing_extra_dtype_nonfinite(z, capsys):
    key = "visual.transformer.resblocks.1.ln_2.bias"
    p = _state(z, lambda s: s.pop(key), "missing_key")
    merge_refused(capsys, z, [str(p)], "missing_key.safetensors", key, "missing")
    p = _state(z, lambda s: s.update({"visual.extra_adapter.weight": torch.zeros(3)}), "extra_key")
    merge_refused(capsys, z, [str(p)], "extra_key.safetensors", "visual.extra_adapter.weight")
    p = _state(z, lambda s: s.update({key: s[key].double()}), "float64_tensor")
    merge_refused(capsys, z, [str(p)], "float64_tensor.safetensors", key, "dtype")
    p = _state(z, lambda s: s.update({k: v.to(torch.bfloat16) for k, v in s.items() if v.is_floating_point()}), "all_bf16")
    merge_refused(capsys, z, [str(p)], "all_bf16.safetensors", "dtype")
    for value, word in ((float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")):

        def poison(s, value=value):
            t = s["visual.proj"].clone()
            t[1, 2] = value
            s["visual.proj"] = t

        name = f"poison_{word}_{int(value < 0)}"
        p = _state(z, poison, name)
        merge_refused(capsys, z, [str(p), str(z.tasks[1])], f"{name}.safetensors", "visual.proj", word)
        merge_refused(capsys, z, [str(z.tasks[0])], f"{name}.safetensors", "visual.proj", word, base=p)


@pytest.mark.parametrize("heads", ["two", "0", "-2"])
def test_malformed_architecture_metadata(z, capsys, heads):
    p = write(z.tmp / f"meta_heads_{heads}.safetensors", z.states[0], {"heads": heads})
    merge_refused(capsys, z, [str(z.tasks[0])], f"meta_heads_{heads}.safetensors", base=p)


def test_same_checkpoint_twice_and_no_tasks(z, capsys):
    merge_refused(capsys, z, [f"a={z.tasks[0]}", f"b={z.tasks[0]}"], "given twice")
    merge_refused(capsys, z, [f"a={z.tasks[0]}", f"b={z.tasks[0].parent}/./{z.tasks[0].name}"], "given twice")
    copy = z.tmp / "copy_of_task0.safetensors"
    shutil.copy(z.tasks[0], copy)
    merge_refused(capsys, z, [str(z.tasks[0]), str(copy)], "copy_of_task0.safetensors", "identical")
    merge_refused(capsys, z, [str(z.base)], "open_clip_base.safetensors", "identical")
    merge_refused(capsys, z, [f"a={z.tasks[0]}", f"a={z.tasks[1]}"], "'a'", "twice")
    merge_refused(capsys, z, [], "no task")


def test_unknown_scheme_and_arch(z, capsys):
    g = torch.Generator().manual_seed(0)
    resnet = {
        "conv1.weight": torch.randn(8, 3, 7, 7, generator=g),
        "bn1.weight": torch.ones(8),
        "bn1.bias": torch.zeros(8),
        "bn1.running_mean": torch.zeros(8),
        "bn1.running_var": torch.ones(8),
        "bn1.num_batches_tracked": torch.tensor(0),
        "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 8, generator=g),
        "fc.bias": torch.zeros(10),
    }
    p = write(z.tmp / "resnet.safetensors", resnet)
    merge_refused(capsys, z, [str(p)], "resnet.safetensors", "unrecognised key scheme")
    merge_refused(capsys, z, [str(z.tasks[0])], "resnet.safetensors", "unrecognised key scheme", base=p)
    eval_refused(capsys, z, f"t={z.head}:{z.data}", "resnet.safetensors", "unrecognised key scheme", model=p)
    merge_refused(capsys, z, [str(z.tasks[0])], "unknown architecture", "ViT-Q-99", extra=("--arch", "ViT-Q-99"))
    arch_json = z.tmp / "arch_bad.json"
    arch_json.write_text(json.dumps({"width": WIDTH, "wings": 2}))
    merge_refused(capsys, z, [str(z.tasks[0])], "wings", extra=("--arch", str(arch_json)))
    arch_lie = z.tmp / "arch_lie.json"
    arch_lie.write_text(json.dumps({"width": 2 * WIDTH}))
    merge_refused(capsys, z, [str(z.tasks[0])], "width", extra=("--arch", str(arch_lie)))
    txt = z.tmp / "weights.txt"
    txt.write_text("not weights")
    merge_refused(capsys, z, [str(txt)], "weights.txt", "unknown checkpoint format")
    merge_refused(capsys, z, [str(z.tmp / "nowhere.safetensors")], "nowhere.safetensors", "no such file")


# --------------------------------------------------------------------------- sharded checkpoints


def _sharded(z, name: str, weight_map_edit) -> Path:
    d = z.tmp / name
    d.mkdir()
    state = dict(z.states[0])
    keys = list(state)
    half = len(keys) // 2
    save_tensors(d / "a.safetensors", {k: state[k] for k in keys[:half]})
    save_tensors(d / "b.safetensors", {k: state[k] for k in keys[half:]})
    weight_map = {k: "a.safetensors" for k in keys[:half]} | {k: "b.safetensors" for k in keys[half:]}
    weight_map = weight_map_edit(weight_map, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_sharded_index(z, capsys):
    def missing(wm, d):
        return {k: ("c.safetensors" if v == "b.safetensors" else v) for k, v in wm.items()}

    def outside(wm, d):
        shutil.copy(d / "b.safetensors", d.parent / "x.safetensors")
        return {k: ("../x.safetensors" if v == "b.safetensors" else v) for k, v in wm.items()}

    def absolute(wm, d):
        return {k: (str(d / "b.safetensors") if v == "b.safetensors" else v) for k, v in wm.items()}

    def dup(wm, d):
        # b.safetensors also holds a tensor of a.safetensors
        first = next(iter(wm))
        save_tensors(d / "b.safetensors", {first: z.states[0][first]} | {k: z.states[0][k] for k, v in wm.items() if v == "b.safetensors"})
        return wm

    d = _sharded(z, "shard_missing", missing)
    merge_refused(capsys, z, [str(d)], "model.safetensors.index.json", "c.safetensors")
    d = _sharded(z, "shard_outside", outside)
    merge_refused(capsys, z, [str(d)], "model.safetensors.index.json", "../x.safetensors", "outside")
    d = _sharded(z, "shard_absolute", absolute)
    merge_refused(capsys, z, [str(d)], "model.safetensors.index.json", "b.safetensors")
    d = _sharded(z, "shard_outside_abs", lambda wm, d: {k: (str(z.tmp / "x.safetensors") if v == "b.safetensors" else v) for k, v in wm.items()})
    merge_refused(capsys, z, [str(d)], "model.safetensors.index.json", "x.safetensors", "outside")
    d = _sharded(z, "shard_list_value", lambda wm, d: {k: (["b.safetensors"] if v == "b.safetensors" else v) for k, v in wm.items()})
    merge_refused(capsys, z, [str(d)], "model.safetensors.index.json", "weight_map")
    d = _sharded(z, "shard_dup", dup)
    merge_refused(capsys, z, [str(d)], "shard_dup", "two shards")
    d = _sharded(z, "shard_garbage", lambda wm, d: wm)
    (d / "model.safetensors.index.json").write_text("{not json")
    merge_refused(capsys, z, [str(d)], "model.safetensors.index.json")
    d = _sharded(z, "shard_nomap", lambda wm, d: wm)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    merge_refused(capsys, z, [str(d)], "model.safetensors.index.json", "weight_map")
    d = _sharded(z, "shard_config", lambda wm, d: wm)
    (d / "config.json").write_text("[1, 2")
    merge_refused(capsys, z, [str(d)], "config.json")
    empty = z.tmp / "empty_model_dir"
    empty.mkdir()
    merge_refused(capsys, z, [str(empty)], "empty_model_dir", "holds no model")


# --------------------------------------------------------------------------- heads that do not fit


def test_heads_that_do_not_fit(z, capsys):
    d = fresh(z, "heads")
    save_tensors(d / "wide_head.safetensors", {"weight": torch.zeros(CLASSES, EMBED * 2)})
    save_tensors(d / "few_classes.safetensors", {"weight": torch.zeros(CLASSES - 2, EMBED)})
    save_tensors(d / "flat_head.safetensors", {"weight": torch.zeros(EMBED)})
    save_tensors(d / "bad_bias.safetensors", {"weight": torch.zeros(CLASSES, EMBED), "bias": torch.zeros(CLASSES + 1)})
    save_tensors(d / "nan_head.safetensors", {"weight": torch.full((CLASSES, EMBED), float("nan"))})
    save_tensors(d / "no_weight.safetensors", {"kernel": torch.zeros(CLASSES, EMBED)})
    eval_refused(capsys, z, f"t={d / 'wide_head.safetensors'}:{z.data}", "wide_head.safetensors", f"{EMBED * 2} features", str(EMBED))
    eval_refused(capsys, z, f"t={d / 'few_classes.safetensors'}:{z.data}", "data.npz", f"{CLASSES - 2} classes")
    eval_refused(capsys, z, f"t={d / 'few_classes.safetensors'}:{z.folder}", "folder", f"{CLASSES - 2} classes")
    eval_refused(capsys, z, f"t={d / 'flat_head.safetensors'}:{z.data}", "flat_head.safetensors", "2-D")
    eval_refused(capsys, z, f"t={d / 'bad_bias.safetensors'}:{z.data}", "bad_bias.safetensors", "bias")
    eval_refused(capsys, z, f"t={d / 'nan_head.safetensors'}:{z.data}", "nan_head.safetensors", "NaN")
    eval_refused(capsys, z, f"t={d / 'no_weight.safetensors'}:{z.data}", "no_weight.safetensors", "weight")
    tasks = [f"a={z.tasks[0]}", f"b={z.tasks[1]}"]
    merge_refused(capsys, z, tasks, "wide_head.safetensors", f"{EMBED * 2} features", extra=("--heads", f"a={d / 'wide_head.safetensors'}"))
    merge_refused(capsys, z, tasks, "nan_head.safetensors", extra=("--method", "wemoe", "--heads", f"b={d / 'nan_head.safetensors'}"))
    merge_refused(capsys, z, tasks, "'c'", extra=("--heads", f"c={z.head}"))
    merge_refused(
        capsys, z, tasks, "wide_head.safetensors", extra=("--method", "wemoe", "--heads", f"a={d / 'wide_head.safetensors'}", "--data", f"a={z.data}")
    )


# --------------------------------------------------------------------------- data directories and .npz files


def test_mislabelled_npz(z, capsys):
    d = fresh(z, "npz")
    x, y = z.x, z.y
    np.savez(d / "beyond.npz", x=x, y=y + CLASSES)
    eval_refused(capsys, z, f"t={z.head}:{d / 'beyond.npz'}", "beyond.npz", f"{CLASSES} classes")
    np.savez(d / "negative.npz", x=x, y=y - 5)
    eval_refused(capsys, z, f"t={z.head}:{d / 'negative.npz'}", "negative.npz")
    np.savez(d / "short_labels.npz", x=x, y=y[:-1])
    eval_refused(capsys, z, f"t={z.head}:{d / 'short_labels.npz'}", "short_labels.npz", "labels")
    np.savez(d / "float_labels.npz", x=x, y=y.astype(np.float32) + 0.5)
    eval_refused(capsys, z, f"t={z.head}:{d / 'float_labels.npz'}", "float_labels.npz", "integers")
    np.savez(d / "2d_labels.npz", x=x, y=y.reshape(2, -1))
    eval_refused(capsys, z, f"t={z.head}:{d / '2d_labels.npz'}", "2d_labels.npz", "labels")
    np.savez(d / "float_images.npz", x=x.astype(np.float32) / 255, y=y)
    eval_refused(capsys, z, f"t={z.head}:{d / 'float_images.npz'}", "float_images.npz", "uint8")
    np.savez(d / "two_channels.npz", x=x[..., :2], y=y)
    eval_refused(capsys, z, f"t={z.head}:{d / 'two_channels.npz'}", "two_channels.npz", "images must be")
    np.savez(d / "no_x.npz", images=x, y=y)
    eval_refused(capsys, z, f"t={z.head}:{d / 'no_x.npz'}", "no_x.npz", "'x'")
    np.savez(d / "no_images.npz", x=x[:0], y=y[:0])
    eval_refused(capsys, z, f"t={z.head}:{d / 'no_images.npz'}", "no_images.npz", "no images")
    np.savez(d / "no_labels.npz", x=x)
    eval_refused(capsys, z, f"t={z.head}:{d / 'no_labels.npz'}", "no_labels.npz", "no labels")
    np.savez(d / "objects.npz", x=np.array([x[0], "payload"], dtype=object), y=y[:2])
    eval_refused(capsys, z, f"t={z.head}:{d / 'objects.npz'}", "objects.npz")
    (d / "truncated.npz").write_bytes((z.data.read_bytes())[:300])
    eval_refused(capsys, z, f"t={z.head}:{d / 'truncated.npz'}", "truncated.npz")
    (d / "data.csv").write_text("1,2,3\n")
    eval_refused(capsys, z, f"t={z.head}:{d / 'data.csv'}", "data.csv", "image folder or an .npz")
    eval_refused(capsys, z, f"t={z.head}:{d / 'nothing_here'}", "nothing_here", "no such file")
    for report, fragment in ((d, "is a directory"), (d / "missing_dir" / "r.json", "does not exist")):
        rc, stdout, err = run_cli(capsys, "eval", z.base, "--task", f"t={z.head}:{z.data}", "--json", report)
        assert_one_line_error(rc, err, str(report), fragment)
        assert stdout == ""


def test_bad_data_refuses_a_wemoe_merge_before_compute(z, capsys, monkeypatch):
    import wemoe.methods.wemoe.build

    def no_compute(*a, **k):
        raise AssertionError("compute started before the data was validated")

    monkeypatch.setattr(wemoe.methods.wemoe.build, "build_wemoe", no_compute)
    d = fresh(z, "merge_data")
    np.savez(d / "float_images.npz", x=z.x.astype(np.float32), y=z.y)
    np.savez(d / "short_labels.npz", x=z.x, y=z.y[:3])
    tasks = [f"a={z.tasks[0]}", f"b={z.tasks[1]}"]
    for name, fragment in (("float_images.npz", "uint8"), ("short_labels.npz", "labels")):
        merge_refused(capsys, z, tasks, name, fragment, extra=("--method", "wemoe", "--heads", f"a={z.head}", "--data", f"a={d / name}"))
    merge_refused(capsys, z, tasks, "'c'", extra=("--method", "wemoe", "--heads", f"a={z.head}", "--data", f"c={z.data}"))
    # the data's labels say which head it belongs with: a head with too few classes is the wrong one
    save_tensors(d / "two_classes.safetensors", {"weight": torch.zeros(2, EMBED)})
    merge_refused(
        capsys, z, tasks, "data.npz", "2 classes", extra=("--method", "wemoe", "--heads", f"a={d / 'two_classes.safetensors'}", "--data", f"a={z.data}")
    )
    merge_refused(
        capsys, z, tasks, "folder", "2 classes", extra=("--method", "wemoe", "--heads", f"a={d / 'two_classes.safetensors'}", "--data", f"a={z.folder}")
    )
    merge_refused(capsys, z, tasks, "only applies", extra=("--data", f"a={z.data}"), code=2)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (a decompression bomb), with valid checksums."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _folder(z, name: str) -> Path:
    d = z.tmp / name
    shutil.copytree(z.folder, d)
    return d


def test_broken_image_folders(z, capsys):
    empty = z.tmp / "empty_data"
    empty.mkdir()
    eval_refused(capsys, z, f"t={z.head}:{empty}", "empty_data", "no class sub-folders")
    hollow = z.tmp / "hollow_data"
    for c in range(CLASSES):
        (hollow / str(c)).mkdir(parents=True)
    eval_refused(capsys, z, f"t={z.head}:{hollow}", "hollow_data", "no images")
    d = _folder(z, "with_text")
    (d / "1" / "readme.txt").write_text("hi")
    eval_refused(capsys, z, f"t={z.head}:{d}", "readme.txt", "not an image")
    d = _folder(z, "with_exe")
    (d / "2" / "run.sh").write_bytes(b"#!/bin/sh\ntouch pwned\n")
    eval_refused(capsys, z, f"t={z.head}:{d}", "run.sh", "not an image")
    d = _folder(z, "corrupt_png")
    (d / "3" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0garbage" * 20)
    eval_refused(capsys, z, f"t={z.head}:{d}", "bad.png", "cannot read image")
    d = _folder(z, "truncated_png")
    (d / "0" / "cut.png").write_bytes((d / "0" / "a.png").read_bytes()[:100])
    eval_refused(capsys, z, f"t={z.head}:{d}", "cut.png", "cannot read image")
    d = _folder(z, "text_as_png")
    (d / "0" / "fake.png").write_text("I am not a PNG")
    eval_refused(capsys, z, f"t={z.head}:{d}", "fake.png", "cannot read image")
    d = _folder(z, "bomb_png")
    (d / "1" / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    eval_refused(capsys, z, f"t={z.head}:{d}", "bomb.png", "cannot read image")
    d = _folder(z, "extra_class")
    (d / "4").mkdir()
    shutil.copy(d / "0" / "a.png", d / "4" / "a.png")
    eval_refused(capsys, z, f"t={z.head}:{d}", "extra_class", f"{CLASSES} classes")
    # a corrupted image refuses the wemoe merge too, before anything is written
    d = _folder(z, "corrupt_png_merge")
    (d / "3" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0garbage" * 20)
    merge_refused(
        capsys,
        z,
        [f"a={z.tasks[0]}", f"b={z.tasks[1]}"],
        "bad.png",
        extra=("--method", "wemoe", "--heads", f"a={z.head}", "--data", f"a={d}", "--steps", "2", "--batch-size", "4"),
    )


def test_mixed_image_sizes_are_not_an_internal_error(z, capsys):
    from PIL import Image

    d = _folder(z, "mixed_sizes")
    Image.fromarray(z.x[5][:20, :28]).save(d / "1" / "b.png")
    Image.fromarray(z.x[6][:, :, 0]).save(d / "2" / "gray.png")
    rc, stdout, err = run_cli(capsys, "eval", z.base, "--task", f"t={z.head}:{d}", "-q")
    assert rc == 0, err
    assert "average" in stdout


def test_unreadable_data(z, capsys, monkeypatch):
    d = _folder(z, "unreadable_class")
    victim = d / "2"
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == victim:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    eval_refused(capsys, z, f"t={z.head}:{d}", "unreadable_class/2", "Permission denied")
    monkeypatch.undo()
    if IS_ROOT:
        return  # chmod does not stop root from reading; the simulated refusal above covers it
    try:
        victim.chmod(0)
        eval_refused(capsys, z, f"t={z.head}:{d}", "unreadable_class/2", "Permission denied")
        victim.chmod(0o755)
        npz = z.tmp / "locked.npz"
        shutil.copy(z.data, npz)
        npz.chmod(0)
        eval_refused(capsys, z, f"t={z.head}:{npz}", "locked.npz")
        locked = z.tmp / "locked.safetensors"
        shutil.copy(z.tasks[0], locked)
        locked.chmod(0)
        merge_refused(capsys, z, [str(locked)], "locked.safetensors", "cannot open")
    finally:
        victim.chmod(0o755)


@pytest.mark.skipif(not IS_ROOT, reason="exercises the root-only path")
def test_unreadable_checkpoint_as_root(z, capsys):
    # root reads through chmod 000; a checkpoint that is a directory of the right name cannot be read either
    d = z.tmp / "dir_named.safetensors"
    d.mkdir()
    merge_refused(capsys, z, [str(d)], "dir_named.safetensors")
    link = z.tmp / "dangling.safetensors"
    link.symlink_to(z.tmp / "gone.safetensors")
    merge_refused(capsys, z, [str(link)], "dangling.safetensors", "no such file")


# --------------------------------------------------------------------------- output paths


def test_output_paths(z, capsys):
    tasks = [str(t) for t in z.tasks]
    afile = z.tmp / "out_is_a_file"
    afile.write_text("keep me")
    rc, _, err = run_cli(capsys, "merge", "--base", z.base, "--tasks", *tasks, "--out", afile)
    assert_one_line_error(rc, err, "out_is_a_file", "is a file")
    assert afile.read_text() == "keep me"
    existing = z.tmp / "out_exists"
    existing.mkdir()
    (existing / "precious.txt").write_text("keep me")
    rc, _, err = run_cli(capsys, "merge", "--base", z.base, "--tasks", *tasks, "--out", existing)
    assert_one_line_error(rc, err, "out_exists", "already exists", "--force")
    assert (existing / "precious.txt").read_text() == "keep me"
    rc, _, err = run_cli(capsys, "merge", "--base", z.base, "--tasks", *tasks, "--out", z.tmp / "no_parent" / "deeper" / "out")
    assert_one_line_error(rc, err, "no_parent", "does not exist")
    assert not (z.tmp / "no_parent").exists()
    # a refused input must not consume --force's existing output either
    rc, _, err = run_cli(capsys, "merge", "--base", z.base, "--tasks", str(z.tasks[0]), str(z.tasks[0]), "--out", existing, "--force")
    assert_one_line_error(rc, err, "given twice")
    assert (existing / "precious.txt").read_text() == "keep me"
    if not IS_ROOT:
        ro = z.tmp / "read_only_parent"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            rc, _, err = run_cli(capsys, "merge", "--base", z.base, "--tasks", *tasks, "--out", ro / "out")
            assert_one_line_error(rc, err, "read_only_parent", "not writable")
            assert not (ro / "out").exists()
        finally:
            ro.chmod(0o755)


# --------------------------------------------------------------------------- options


def test_bad_numbers_and_names(z, capsys):
    tasks = [f"a={z.tasks[0]}", f"b={z.tasks[1]}"]
    merge_refused(capsys, z, tasks, "--lambda", extra=("--lambda", "abc"), code=2)
    merge_refused(capsys, z, tasks, "--lambda", "finite", extra=("--lambda", "nan"))
    merge_refused(capsys, z, tasks, "--lambda", "finite", extra=("--lambda", "inf"))
    merge_refused(capsys, z, tasks, "--steps", extra=("--method", "wemoe", "--steps", "-1"))
    merge_refused(capsys, z, tasks, "--lr", extra=("--method", "wemoe", "--lr", "0"))
    merge_refused(capsys, z, tasks, "--lr", extra=("--method", "wemoe", "--lr", "-1e-3"))
    merge_refused(capsys, z, tasks, "--batch-size", extra=("--method", "wemoe", "--batch-size", "0"))
    merge_refused(capsys, z, tasks, "--ties-k", extra=("--method", "ties", "--ties-k", "nan"))
    merge_refused(capsys, z, tasks, "--seed", extra=("--seed", "one"), code=2)
    merge_refused(capsys, z, tasks, "magic", extra=("--method", "magic"), code=2)
    merge_refused(capsys, z, tasks, "bfloat8", extra=("--dtype", "bfloat8"), code=2)
    merge_refused(capsys, z, tasks, "--device", extra=("--device", "tpu"), code=2)
    merge_refused(capsys, z, tasks, "size", "lots", extra=("--shard-size", "lots"))
    merge_refused(capsys, z, tasks, "size", extra=("--shard-size", "-5MB"))
    merge_refused(capsys, z, tasks, "--coef-range", extra=("--method", "wemoe", "--coef-range", "a,b"))
    merge_refused(capsys, z, tasks, "--moe-blocks", extra=("--method", "wemoe", "--moe-blocks", "middle:2"))
    merge_refused(capsys, z, tasks, "only applies", extra=("--steps", "5"), code=2)
    rc, _, err = run_cli(capsys, "merge", "--tasks", *tasks, "--out", z.tmp / "no_base")
    assert rc == 2 and not (z.tmp / "no_base").exists()
    assert_one_line_error(rc, err, "missing --base")
    eval_refused(capsys, z, f"t={z.head}:{z.data}", "--batch-size", extra=("--batch-size", "0"))
    eval_refused(capsys, z, f"t={z.head}:{z.data}", "--limit", extra=("--limit", "-1"))
    eval_refused(capsys, z, f"={z.head}:{z.data}", "empty task name")


def test_config_files(z, capsys):
    tasks = [f"a={z.tasks[0]}"]

    def cfg(name: str, text: str) -> Path:
        p = z.tmp / name
        p.write_text(text)
        return p

    bad_yaml = cfg("broken.yaml", "base: [unclosed\ntasks: {a: 1\n")
    merge_refused(capsys, z, tasks, "broken.yaml", "invalid YAML", extra=("--config", str(bad_yaml)))
    unknown = cfg("unknown_key.yaml", f"base: {z.base}\nlamda: 0.3\n")
    merge_refused(capsys, z, tasks, "unknown_key.yaml", "lamda", extra=("--config", str(unknown)))
    unknown_task_field = cfg("task_field.yaml", f"tasks:\n  a: {{checkpoint: {z.tasks[0]}, weights: 2}}\n")
    merge_refused(capsys, z, tasks, "task_field.yaml", "weights", extra=("--config", str(unknown_task_field)))
    scalar = cfg("scalar.yaml", "just a string\n")
    merge_refused(capsys, z, tasks, "scalar.yaml", "mapping", extra=("--config", str(scalar)))
    tasks_list = cfg("tasks_list.yaml", f"tasks: [{z.tasks[0]}]\n")
    merge_refused(capsys, z, tasks, "tasks_list.yaml", "tasks", extra=("--config", str(tasks_list)))
    python_tag = cfg("python_tag.yaml", "base: !!python/object/apply:os.system ['touch pwned_yaml']\n")
    merge_refused(capsys, z, tasks, "python_tag.yaml", extra=("--config", str(python_tag)))
    assert not Path("pwned_yaml").exists() and not (z.tmp / "pwned_yaml").exists()
    merge_refused(capsys, z, tasks, "absent.yaml", extra=("--config", str(z.tmp / "absent.yaml")))
    wrong_type = cfg("wrong_type.yaml", f"base: {z.base}\nlambda: lots\n")
    merge_refused(capsys, z, tasks, "lambda", extra=("--config", str(wrong_type)))
    wrong_steps = cfg("wrong_steps.yaml", f"base: {z.base}\nmethod: wemoe\nsteps: many\n")
    merge_refused(capsys, z, tasks, "steps", extra=("--config", str(wrong_steps)))
    wrong_method = cfg("wrong_method.yaml", f"base: {z.base}\nmethod: magic\n")
    merge_refused(capsys, z, tasks, "magic", extra=("--config", str(wrong_method)))


# --------------------------------------------------------------------------- --debug


def test_debug_shows_the_traceback(z, capsys):
    path, _ = CORRUPT["garbage_json"](z, fresh(z, "debug"))
    args = ["merge", "--base", str(z.base), "--tasks", str(path), "--out", str(z.tmp / "never")]
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, "garbage.safetensors")
    with pytest.raises(WemoeError, match="not valid JSON") as info:
        main(["--debug", *args])
    assert info.traceback  # propagates with its traceback instead of being printed as one line
    assert capsys.readouterr().err == ""
    assert not (z.tmp / "never").exists()
