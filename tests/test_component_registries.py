"""Routers, expert stores and objectives are registries like the methods: a kind defined in a
test-local module (tests/toy_components.py) gets its choice, flags, YAML keys, checks, record
and a working merge through the CLI, without touching the package."""

import json

import numpy as np
import pytest
import torch
import yaml

import wemoe
from wemoe.io.safetensors_io import load_tensors, save_tensors

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from factories import zoo

T = 2


@pytest.fixture
def toys():
    import toy_components

    toy_components.register_all()
    yield toy_components
    toy_components.unregister_all()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds")
    base, tasks, base_state, states = zoo(tmp, tasks=T)
    rng = np.random.default_rng(0)
    heads, data = {}, {}
    for i in range(T):
        save_tensors(tmp / f"h{i}.safetensors", {"weight": torch.randn(4, 16, generator=torch.Generator().manual_seed(i))}, {"normalize": "true"})
        np.savez(tmp / f"d{i}.npz", x=rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 4, 24))
        heads[f"t{i}"], data[f"t{i}"] = tmp / f"h{i}.safetensors", tmp / f"d{i}.npz"
    return tmp, base, tasks, base_state, states, heads, data


def test_toy_kinds_show_up_in_help_with_their_flags(toys, capsys):
    code, out, _ = run_cli(capsys, "merge", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "toy-level" in text and "toy-sign" in text and "toy-margin" in text
    assert "--toy-level" in text and "(--router toy-level)" in text
    assert "--toy-shrink" in text and "(--expert-store toy-sign)" in text
    assert "--toy-weight" in text and "(--objective toy-margin)" in text


def test_toy_router_routes_every_sample_at_its_level(toys, setup, capsys):
    tmp, base, tasks, _, _, heads, data = setup
    out = tmp / "toy-router"
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", out, "--router", "toy-level", "--toy-level", "0.25", "--steps", "0", heads=heads, data=data)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["parameters"]["router"] == "toy-level" and cfg["parameters"]["toy_level"] == 0.25
    assert cfg["wemoe"]["router"] == "toy-level" and cfg["wemoe"]["router_options"] == {"level": 0.25}
    model = wemoe.load(out)
    routes = model.routing(torch.randn(3, 3, 32, 32))
    assert len(routes) == 2 and all(torch.equal(r, torch.full((3, T), 0.25)) for r in routes)


def test_toy_store_keeps_signs_and_one_scale(toys, setup, capsys):
    tmp, base, tasks, base_state, states, heads, data = setup
    out = tmp / "toy-store"
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", out, "--expert-store", "toy-sign", "--toy-shrink", "0.5", "--steps", "0", heads=heads)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["wemoe"]["expert_store"] == {"kind": "toy-sign", "options": {"shrink": 0.5}} and cfg["wemoe"]["rank"] is None
    tensors, _ = load_tensors(out / "model.safetensors")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    tau = states[1][key] - base_state[key]
    assert torch.equal(tensors["blocks.0.mlp.fc1.experts.signs"][1], torch.sign(tau).to(torch.int8))
    assert torch.allclose(tensors["blocks.0.mlp.fc1.experts.scale"][1], 0.5 * tau.abs().mean(), rtol=1e-6)
    model = wemoe.load(out)  # rebuilt from the record alone
    weight, _ = model.blocks[0].mlp.fc1.merged(torch.tensor([0.0, 1.0]))
    assert torch.allclose(weight, base_state[key] + 0.5 * tau.abs().mean() * torch.sign(tau), atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_toy_objective_trains_wemoe_and_adamerging(toys, setup, capsys):
    tmp, base, tasks, _, _, heads, data = setup
    for method, extra in (("wemoe", ["--lr", "1e-2"]), ("adamerging", ["--lr", "1e-2", "--granularity", "task"])):
        out = tmp / f"toy-objective-{method}"
        flags = ["--objective", "toy-margin", "--toy-weight", "2", "--steps", "2", "--batch-size", "4", *extra]
        code, _, err = merge_cli(capsys, base, tasks, method, out, *flags, heads=heads, data=data)
        assert code == 0, err
        cfg = json.loads((out / "config.json").read_text())
        section = cfg["wemoe" if method == "wemoe" else "adamerging"]
        assert section["adaptation"]["objective"] == "2 x minus mean top-1 log-probability"
        assert cfg["parameters"]["objective"] == "toy-margin" and cfg["parameters"]["toy_weight"] == 2.0
        # 2 x -log(top-1 probability) per task, summed over the 2 tasks: between 0 and 2 x 2 x log(4 classes)
        assert all(0 < section["adaptation"][k] <= 4 * np.log(4) for k in ("initial_loss", "final_loss"))


def test_toy_options_from_yaml_and_in_the_dry_run(toys, setup, capsys):
    tmp, base, tasks, _, _, heads, data = setup
    cfg = {
        "base": str(base),
        "method": "wemoe",
        "router": "toy-level",
        "toy_level": 0.75,
        "objective": "toy-margin",
        "out": str(tmp / "toy-yaml"),
        "tasks": {f"t{i}": {"checkpoint": str(p), "head": str(heads[f"t{i}"]), "data": str(data[f"t{i}"])} for i, p in enumerate(tasks)},
    }
    (tmp / "toy.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(capsys, "merge", "--config", tmp / "toy.yaml", "--dry-run", "-q")
    assert code == 0, err
    assert "router=toy-level" in out and "toy_level=0.75" in out and "objective=toy-margin" in out and "router toy-level" in out


def test_an_option_of_another_kind_is_refused(toys, setup, capsys):
    tmp, base, tasks, _, _, heads, data = setup
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--toy-level", "0.5", heads=heads)
    assert_one_line_error(code, err, "--toy-level only applies to --router toy-level (not mlp)")
    assert code == 2
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--gate-rank", "4", heads=heads)
    assert_one_line_error(code, err, "--gate-rank only applies to --router subspace (not mlp)")
    code, _, err = merge_cli(capsys, base, tasks, "adamerging", tmp / "never", "--objective", "task", heads=heads, data=data)
    assert_one_line_error(code, err, "--objective task trains routers")
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--router", "nope", heads=heads)
    assert_one_line_error(code, err, "--router must be one of", "toy-level")
    assert code == 2
    assert not (tmp / "never").exists()


def test_unregistered_toys_are_gone(setup, capsys):
    tmp, base, tasks, _, _, heads, _ = setup
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "never", "--router", "toy-level", heads=heads)
    assert_one_line_error(code, err, "--router must be one of mlp, linear, constant, prototype, subspace")


def test_registering_a_conflicting_option_type_fails():
    from dataclasses import dataclass

    from wemoe.core.params import param
    from wemoe.moe.routers import ROUTERS, RouterKind

    class Bad(RouterKind):
        name = "bad-types"

        @dataclass(frozen=True)
        class Options:
            gate_rank: str = param("x", "a string where subspace has an integer")

    with pytest.raises(TypeError, match="gate_rank"):
        ROUTERS.register(Bad)
    assert "bad-types" not in ROUTERS.names()
