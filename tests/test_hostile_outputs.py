"""Outputs read back are untrusted input, and no output ever replaces or holds an input.

A real static merge and a real WEMoE merge are written once per module; each case
copies one, tampers with its record or heads, and expects ``wemoe.load`` and
``wemoe eval`` to refuse it in one line before anything is built. The data-loss
cases give ``--force`` an output path that is, holds or lies inside an input and
check the input is still byte for byte what it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import wemoe
from wemoe.cli import main
from wemoe.errors import WemoeError
from wemoe.io.safetensors_io import load_tensors, save_tensors

from cli_helpers import assert_one_line_error, run_cli
from factories import EMBED, HEADS, IMAGE, PATCH, WIDTH, zoo

CLASSES = 4


def cli(*args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert not exc.code, exc.code


@pytest.fixture(scope="module")
def o(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_outputs")
    base, tasks, _, _ = zoo(tmp, tasks=2)
    rng = np.random.default_rng(0)
    heads = {}
    for name in ("a", "b"):
        heads[name] = tmp / f"head_{name}.safetensors"
        save_tensors(heads[name], {"weight": torch.randn(CLASSES, EMBED), "bias": torch.zeros(CLASSES)})
    data = tmp / "data.npz"
    np.savez(data, x=rng.integers(0, 256, (8, IMAGE, IMAGE, 3), dtype=np.uint8), y=np.arange(8) % CLASSES)
    common = ["--base", base, "--tasks", f"a={tasks[0]}", f"b={tasks[1]}", "--heads", f"a={heads['a']}", f"b={heads['b']}", "-q"]
    cli("merge", *common, "--out", tmp / "static")
    cli("merge", *common, "--method", "wemoe", "--data", f"a={data}", f"b={data}", "--steps", "1", "--batch-size", "4", "--out", tmp / "moe")
    return SimpleNamespace(tmp=tmp, base=base, tasks=tasks, heads=heads, data=data, static=tmp / "static", moe=tmp / "moe", n=0)


def digest(path: Path) -> str:
    """A hash of a file or of a whole directory tree (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def tampered(o, kind: str, edit=None, raw: str | None = None, heads: dict | None = None, head_meta: dict | None = None) -> Path:
    """A copy of the static or WEMoE output with its record or heads changed."""
    o.n += 1
    d = o.tmp / f"tampered{o.n:03d}_{kind}"
    shutil.copytree(o.static if kind == "static" else o.moe, d)
    if edit is not None:
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    if raw is not None:
        (d / "config.json").write_text(raw)
    if heads is not None:
        save_tensors(d / "heads.safetensors", heads, head_meta)
    return d


def refused(capsys, o, model: Path, *fragments: str) -> None:
    """``wemoe.load`` raises WemoeError and ``wemoe eval`` prints one line, exits non-zero and writes no report."""
    with pytest.raises(WemoeError) as info:
        wemoe.load(model)
    for f in fragments:
        assert f in str(info.value), str(info.value)
    report = o.tmp / "never.json"
    rc, out, err = run_cli(capsys, "eval", model, "--task", f"a=:{o.data}", "--json", report)
    assert_one_line_error(rc, err, *fragments)
    assert out == "" and not report.exists()


def setter(path: str, value):
    def edit(cfg):
        *parents, last = path.split("/")
        for p in parents:
            cfg = cfg[p]
        if value is KeyError:
            del cfg[last]
        else:
            cfg[last] = value

    return edit


# --------------------------------------------------------------------------- records


RECORD_CASES = {
    "depth_1e9": ("architecture/depth", 10**9, "depth"),
    "width_1e9": ("architecture/width", 10**9, "width"),
    "mlp_width_huge": ("architecture/mlp_width", 10**9, "mlp_width"),
    "zero_heads": ("architecture/heads", 0, "heads"),
    "heads_not_dividing": ("architecture/heads", 3, "divisible"),
    "zero_patch": ("architecture/patch_size", 0, "patch_size"),
    "zero_image": ("architecture/image_size", 0, "image_size"),
    "missing_depth": ("architecture/depth", KeyError, "depth"),
    "missing_tasks": ("tasks", KeyError, "tasks"),
    "no_tasks": ("tasks", [], "tasks"),
    "duplicate_tasks": ("tasks", ["a", "a"], "twice"),
    "too_many_tasks": ("tasks", [f"t{i}" for i in range(5000)], "tasks"),
    "task_not_a_name": ("tasks", ["a", 7], "tasks"),
    "eps_text": ("architecture/layer_norm_eps", "small", "layer_norm_eps"),
    "mean_text": ("architecture/mean", "grey", "mean"),
    "mean_two": ("architecture/mean", [0.5, 0.5], "mean"),
    "std_zero": ("architecture/std", [0.0, 1.0, 1.0], "std"),
    "activation": ("architecture/activation", "relu", "activation"),
    "format_version_text": ("format_version", "2", "format_version"),
    "format_version_zero": ("format_version", 0, "format_version"),
    "format_version_huge": ("format_version", 10**400, "format_version"),
    "dtype": ("dtype", "int8", "dtype"),
    "dtype_list": ("dtype", ["float32"], "dtype"),
    "prefix": ("prefix", 5, "prefix"),
    "parameters": ("parameters", [1], "parameters"),
    "method": ("method", None, "method"),
    "inputs_list": ("inputs", [1], "inputs"),
    "inputs_tasks_list": ("inputs/tasks", [1], "inputs"),
    "versions_text": ("versions", "x", "versions"),
    "notes_number": ("notes", 5, "notes"),
    "model_config_list": ("model_config", [1], "model_config"),
    "scheme_unknown": ("scheme", "zzz", "scheme"),
    "seed_negative": ("seed", -1, "seed"),
    "heads_text": ("heads", "ab", "heads"),
}


@pytest.mark.parametrize("kind", ["static", "moe"])
@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_tampered_record_is_refused_before_anything_is_built(o, capsys, kind, case):
    path, value, fragment = RECORD_CASES[case]
    model = tampered(o, kind, setter(path, value))
    refused(capsys, o, model, model.name, fragment)


MOE_CASES = {
    "blocks_past_depth": ("wemoe/moe_blocks", [0, 10**9], "moe_blocks"),
    "blocks_text": ("wemoe/moe_blocks", "all", "moe_blocks"),
    "blocks_none": ("wemoe/moe_blocks", [], "moe_blocks"),
    "groups": ("wemoe/groups", ["foo"], "groups"),
    "rank": ("wemoe/rank", -1, "rank"),
    "router_layers": ("wemoe/router_layers", 10**9, "router_layers"),
    "router_unknown": ("wemoe/router", "nope", "nope"),
    "router_options": ("wemoe/router_options", [1], "router_options"),
    "coef_range_text": ("wemoe/coef_range", "x", "coef_range"),
    "coef_range_reversed": ("wemoe/coef_range", [1, 0], "coef_range"),
    "lambda_missing": ("wemoe/lambda", KeyError, "lambda"),
    "experts": ("wemoe/experts", ["a"], "experts"),
    "third_task": ("tasks", ["a", "b", "c"], "3 tasks"),
    "adaptation_list": ("wemoe/adaptation", [1], "adaptation"),
    "adaptation_data_list": ("wemoe/adaptation/data", [1], "adaptation.data"),
    "adaptation_data_other_task": ("wemoe/adaptation/data", {"zz": {"path": "x"}}, "adaptation.data"),
    "adaptation_path_number": ("wemoe/adaptation/data/a/path", 5, "path"),
    "adaptation_loss_text": ("wemoe/adaptation/final_loss", "low", "final_loss"),
    "adaptation_warnings": ("wemoe/adaptation/warnings", 5, "warnings"),
    "adaptation_diagnostics": ("wemoe/adaptation/diagnostics", "x", "diagnostics"),
    "unseen": ("wemoe/unseen", "zzz", "unseen"),
    "coef_guard": ("wemoe/coef_guard", "zzz", "coef_guard"),
    "expert_store": ("wemoe/expert_store", {"kind": "zzz"}, "zzz"),
}


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_tampered_moe_section_is_refused(o, capsys, case):
    path, value, fragment = MOE_CASES[case]
    edit = setter(path, value)
    if case == "third_task":  # the record agrees with itself; only the tensors disagree

        def edit(cfg):
            cfg["tasks"] = cfg["wemoe"]["experts"] = ["a", "b", "c"]

    model = tampered(o, "moe", edit)
    refused(capsys, o, model, model.name, fragment)


@pytest.mark.parametrize("case", ["adaptation_data_list", "expert_store", "scheme_unknown", "depth_1e9"])
def test_every_command_that_reads_an_output_refuses_a_tampered_one(o, capsys, case):
    path, value, fragment = {**RECORD_CASES, **MOE_CASES}[case]
    model = tampered(o, "moe", setter(path, value))
    commands = [
        ("inspect", model),
        ("export", model, "--task", "a", "--data", o.data, "--out", o.tmp / f"never_export_{case}"),
        ("routes", model, "--task", f"a={o.data}"),
        ("eval", model, "--task", f"a=:{o.data}", "--card"),
    ]
    before = digest(model)
    for args in commands:
        rc, out, err = run_cli(capsys, *args)
        assert rc == 1, err
        assert_one_line_error(rc, err, model.name, fragment)
        assert "internal error" not in err
    assert digest(model) == before and not (o.tmp / f"never_export_{case}").exists()


@pytest.mark.parametrize("kind", ["static", "moe"])
def test_record_that_lies_about_the_tensors(o, capsys, kind):
    """A consistent record whose architecture is not the tensors': refused from the file headers, not by building it."""
    model = tampered(o, kind, setter("architecture/depth", 3))
    refused(capsys, o, model, model.name, "depth")
    model = tampered(o, kind, setter("architecture/mlp_width", 128))
    refused(capsys, o, model, model.name, "mlp_width" if kind == "static" else "fc1")
    for field, value in (("patch_bias", True), ("pre_norm", False)):
        model = tampered(o, kind, setter(f"architecture/{field}", value))
        refused(capsys, o, model, model.name, field if kind == "static" else "does not match")


@pytest.mark.parametrize(
    "raw,fragment",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"format": "wemoe", "format_version": NaN}', "format_version"),
        ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "config.json"),
        ('{"format": "wemoe", ', "config.json"),
    ],
    ids=["deep", "nan", "not_utf8", "cut"],
)
def test_unreadable_record(o, capsys, raw, fragment):
    model = tampered(o, "moe", raw=raw)
    refused(capsys, o, model, model.name, fragment)


def test_huge_record_is_not_read_whole(o, capsys):
    model = tampered(o, "static")
    with open(model / "config.json", "wb") as f:
        f.write(b'{"format": "wemoe", "pad": "')
        f.truncate(64 << 20)  # sparse: 64 MiB on paper
    refused(capsys, o, model, model.name, "larger than")


def test_nonfinite_model_tensor(o, capsys):
    for kind in ("static", "moe"):
        model = tampered(o, kind)
        name = "model.safetensors"
        tensors, meta = load_tensors(model / name)
        key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
        save_tensors(model / name, tensors, meta)
        refused(capsys, o, model, "NaN", *([key] if kind == "moe" else []))  # a plain output names its tensor by canonical key


# --------------------------------------------------------------------------- stored heads


def good_head(classes=CLASSES, features=EMBED):
    return {"weight": torch.randn(classes, features), "bias": torch.zeros(classes)}


HEAD_CASES = {
    "nan": ({"a.weight": torch.full((CLASSES, EMBED), float("nan")), "a.bias": torch.zeros(CLASSES)}, None, "NaN"),
    "inf_bias": ({"a.weight": torch.randn(CLASSES, EMBED), "a.bias": torch.full((CLASSES,), float("inf"))}, None, "NaN or Inf"),
    "wrong_features": ({"a.weight": torch.randn(CLASSES, EMBED + 3)}, None, "a.weight"),
    "no_classes": ({"a.weight": torch.randn(0, EMBED), "a.bias": torch.zeros(0)}, None, "classes >= 1"),
    "one_dim": ({"a.weight": torch.randn(EMBED)}, None, "a.weight"),
    "bias_size": ({"a.weight": torch.randn(CLASSES, EMBED), "a.bias": torch.zeros(CLASSES + 1)}, None, "a.bias"),
    "integer_weight": ({"a.weight": torch.ones(CLASSES, EMBED, dtype=torch.int32)}, None, "floats"),
    "unknown_task": ({"z.weight": torch.randn(CLASSES, EMBED)}, None, "z.weight"),
    "bias_only": ({"a.bias": torch.zeros(CLASSES)}, None, "no weight"),
    "classes_not_json": ({"a.weight": torch.randn(CLASSES, EMBED)}, {"a.classes": "[not json"}, "a.classes"),
    "classes_count": ({"a.weight": torch.randn(CLASSES, EMBED)}, {"a.classes": json.dumps(["x"])}, "a.classes"),
    "classes_deep": ({"a.weight": torch.randn(CLASSES, EMBED)}, {"a.classes": "[" * 50_000 + "]" * 50_000}, "a.classes"),
    "normalize": ({"a.weight": torch.randn(CLASSES, EMBED)}, {"a.normalize": "perhaps"}, "a.normalize"),
}


@pytest.mark.parametrize("kind", ["static", "moe"])
@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_tampered_heads(o, capsys, kind, case):
    heads, meta, fragment = HEAD_CASES[case]
    model = tampered(o, kind, heads=heads, head_meta=meta)
    refused(capsys, o, model, "heads.safetensors", fragment)


def test_untampered_outputs_still_load_and_evaluate(o, capsys):
    for model in (o.static, o.moe):
        loaded = wemoe.load(model)
        assert sorted(loaded.heads) == ["a", "b"]
        rc, out, err = run_cli(capsys, "eval", model, "--task", f"a=:{o.data}", "-q")
        assert rc == 0, err


# --------------------------------------------------------------------------- the Python API's load


def test_load_arguments(o):
    with pytest.raises(WemoeError, match="does not exist"):
        wemoe.load(o.tmp / "missing")
    with pytest.raises(WemoeError, match="does not exist"):
        wemoe.load("missing/")
    for bad in (None, 42, ["x"], b"x"):
        with pytest.raises(WemoeError, match="path"):
            wemoe.load(bad)
    for device in ("tpu", 3, "cuda:x", None):
        with pytest.raises(WemoeError, match="device"):
            wemoe.load(o.static, device=device)
    with pytest.raises(WemoeError, match="not a wemoe output"):
        wemoe.load(o.tmp)
    assert wemoe.load(o.static, device=torch.device("cpu")) is not None


# --------------------------------------------------------------------------- nothing lost


def kept(paths, action) -> None:
    """Run ``action``; every path in ``paths`` is byte for byte what it was."""
    before = {p: digest(p) for p in paths}
    action()
    for p, d in before.items():
        assert p.exists() and digest(p) == d, f"{p} was changed"


def test_export_never_replaces_its_model(o, capsys):
    model = tampered(o, "moe")
    for out, fragment in ((model, "is the input"), (model / "sub", "is inside"), (model.parent, "contains")):

        def act(out=out, fragment=fragment):
            rc, _, err = run_cli(capsys, "export", model, "--task", "a", "--data", o.data, "--out", out, "--force")
            assert_one_line_error(rc, err, fragment)

        kept([model, o.data], act)
    assert not (model / "sub").exists()
    data_copy = o.tmp / "export_data_copy.npz"
    shutil.copy(o.data, data_copy)
    kept(
        [data_copy],
        lambda: assert_one_line_error(
            *run_cli(capsys, "export", model, "--task", "a", "--data", data_copy, "--out", data_copy, "--force")[::2], "is the input"
        ),
    )


def test_merge_never_replaces_an_input(o, capsys):
    tmp = o.tmp / "merge_inputs"
    (tmp / "basedir").mkdir(parents=True)
    shutil.copy(o.base, tmp / "basedir" / "model.safetensors")
    base_file = shutil.copy(o.base, tmp / "base.safetensors")
    task = shutil.copy(o.tasks[0], tmp / "task.safetensors")
    head = shutil.copy(o.heads["a"], tmp / "head.safetensors")
    cfg = tmp / "merge.yaml"
    cfg.write_text(f"base: {base_file}\n")
    inputs = [tmp / "basedir", Path(base_file), Path(task), Path(head), cfg]
    ways = [
        (["--base", tmp / "basedir", "--tasks", task], tmp / "basedir", "is the input"),
        (["--base", base_file, "--tasks", task], base_file, "is the input"),
        (["--base", base_file, "--tasks", task], task, "is the input"),
        (["--base", tmp / "basedir", "--tasks", task], tmp / "basedir" / "inner", "is inside"),
        (["--base", base_file, "--tasks", task], tmp, "contains"),
        (["--base", base_file, "--tasks", f"a={task}", "--heads", f"a={head}"], head, "is the input"),
        (["--config", cfg, "--tasks", task], cfg, "is the input"),
    ]
    for args, out, fragment in ways:

        def act(args=args, out=out, fragment=fragment):
            rc, _, err = run_cli(capsys, "merge", *args, "--out", out, "--force", "-q")
            assert_one_line_error(rc, err, fragment)

        kept(inputs, act)
    assert not (tmp / "basedir" / "inner").exists()
    # a symlink to an input is that input
    link = tmp / "link"
    link.symlink_to(tmp / "basedir")
    kept(
        inputs,
        lambda: assert_one_line_error(*run_cli(capsys, "merge", "--base", tmp / "basedir", "--tasks", task, "--out", link, "--force")[::2], "is the input"),
    )


def test_wemoe_merge_never_replaces_its_data(o, capsys):
    tmp = o.tmp / "data_inputs"
    tmp.mkdir()
    data = Path(shutil.copy(o.data, tmp / "data.npz"))
    args = ["--base", o.base, "--tasks", f"a={o.tasks[0]}", "--method", "wemoe", "--heads", f"a={o.heads['a']}", "--data", f"a={data}"]
    kept([data], lambda: assert_one_line_error(*run_cli(capsys, "merge", *args, "--out", data, "--force")[::2], "is the input"))


def test_reports_never_replace_an_input(o, capsys):
    model = tampered(o, "static")
    before = digest(model)
    rc, out, err = run_cli(capsys, "eval", model, "--task", f"a=:{o.data}", "--json", model / "config.json")
    assert_one_line_error(rc, err, "config.json", "input")
    rc, out, err = run_cli(capsys, "eval", model, "--task", f"a=:{o.data}", "--json", o.data)
    assert_one_line_error(rc, err, "is the input")
    assert digest(model) == before
    moe = tampered(o, "moe")
    before = digest(moe)
    rc, out, err = run_cli(capsys, "routes", moe, "--task", f"a={o.data}", "--json", moe / "heads.safetensors")
    assert_one_line_error(rc, err, "heads.safetensors", "input")
    assert digest(moe) == before
    # a new report file inside the model directory replaces nothing: still allowed
    rc, out, err = run_cli(capsys, "eval", model, "--task", f"a=:{o.data}", "--json", model / "results.json", "-q")
    assert rc == 0, err


def test_api_force_and_flags_are_booleans(o):
    existing = o.tmp / "api_existing"
    existing.mkdir()
    (existing / "precious.txt").write_text("keep me")
    for value in ("no", "false", 0, 1):
        with pytest.raises(WemoeError, match="force must be True or False"):
            wemoe.merge(base=o.base, tasks=[o.tasks[0]], out=existing, force=value, quiet=True)
    with pytest.raises(WemoeError, match="dry_run must be True or False"):
        wemoe.merge(base=o.base, tasks=[o.tasks[0]], out=existing, dry_run="yes", quiet=True)
    with pytest.raises(WemoeError, match="is the input"):
        wemoe.merge(base=o.base, tasks=[o.tasks[0]], out=o.base, force=True, quiet=True)
    assert (existing / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- integrations


def timm_of_depth(depth: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(depth)
    return VisionTransformer(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=depth,
        num_heads=HEADS,
        mlp_ratio=4,
        pre_norm=True,
        norm_layer=nn.LayerNorm,
        act_layer="gelu",
        num_classes=EMBED,
        global_pool="token",
    ).eval()


@pytest.mark.parametrize("depth", [1, 3])
def test_timm_integration_changes_nothing_unless_everything_fits(o, depth):
    from wemoe.integrations.timm import use_merged_weights

    model = timm_of_depth(depth)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WemoeError, match="does not match the merge"):
        use_merged_weights(model, o.static)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused merge changed the model's tensors"


def test_integration_argument_types(o):
    from wemoe.integrations.open_clip import use_merged_visual
    from wemoe.integrations.timm import use_merged_weights

    with pytest.raises(WemoeError, match="timm model"):
        use_merged_weights("not a model", o.static)
    with pytest.raises(WemoeError, match="output directory"):
        use_merged_weights(timm_of_depth(2), 42)
    with pytest.raises(WemoeError):
        use_merged_visual(nn.Linear(2, 2), 42)
    with pytest.raises(WemoeError, match="does not exist"):
        use_merged_visual(nn.Linear(2, 2), o.tmp / "missing")
