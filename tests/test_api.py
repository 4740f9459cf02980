"""``wemoe.merge`` is the CLI's twin: same checks, same files byte for byte."""

import pytest
import yaml

import wemoe

from cli_helpers import merge_cli
from factories import zoo
from test_adamerging import heads_and_data

FILES = ("model.safetensors", "config.json", "heads.safetensors")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    base, tasks, _, _ = zoo(tmp, tasks=2)
    heads, data = heads_and_data(tmp, 2)
    return tmp, base, tasks, heads, data


def same_files(a, b):
    for name in FILES:
        if (a / name).exists() or (b / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize(
    "method,params",
    [
        ("task-arithmetic", {"lam": 0.4}),
        ("ties", {"lam": 0.7, "ties_k": 30}),
        ("adamerging", {"granularity": "task", "steps": 3, "lr": 1e-2, "batch_size": 4}),
        ("wemoe", {"steps": 2, "lr": 1e-3, "batch_size": 4, "moe_blocks": "last:1"}),
    ],
)
def test_api_and_cli_write_identical_outputs(setup, capsys, method, params):
    tmp, base, tasks, heads, data = setup
    names = {f"t{i}": str(p) for i, p in enumerate(tasks)}
    adapts = method in ("adamerging", "wemoe")
    api_out = wemoe.merge(
        base=base, tasks=names, method=method, out=tmp / f"{method}-api", heads=heads, data=data if adapts else None, seed=3, quiet=True, **params
    )
    assert api_out == tmp / f"{method}-api"
    flags = []
    for key, value in params.items():
        flags += ["--" + ("lambda" if key == "lam" else key.replace("_", "-")), str(value)]
    code, _, err = merge_cli(capsys, base, names, method, tmp / f"{method}-cli", "--seed", "3", *flags, heads=heads, data=data if adapts else None)
    assert code == 0, err
    same_files(api_out, tmp / f"{method}-cli")


def test_api_from_yaml_with_overrides(setup):
    tmp, base, tasks, heads, _ = setup
    cfg = {
        "base": str(base),
        "method": "task-arithmetic",
        "lambda": 0.2,
        "out": "from-yaml",
        "tasks": {f"t{i}": {"checkpoint": str(p), "head": heads[f"t{i}"]} for i, p in enumerate(tasks)},
    }
    (tmp / "m.yaml").write_text(yaml.safe_dump(cfg))
    out = wemoe.merge(config=tmp / "m.yaml", quiet=True, **{"lambda": 0.25})
    assert out == tmp / "from-yaml"
    model = wemoe.load(out)
    assert model.task_names == ["t0", "t1"] and sorted(model.heads) == ["t0", "t1"]
    assert wemoe.merge(config=tmp / "m.yaml", dry_run=True) is None


def test_api_errors_are_wemoe_errors(setup):
    tmp, base, tasks, _, _ = setup
    with pytest.raises(wemoe.WemoeError, match="only applies to --method ties"):
        wemoe.merge(base=base, tasks=list(tasks), out=tmp / "x", ties_k=10)
    with pytest.raises(wemoe.WemoeError, match="unknown method"):
        wemoe.merge(base=base, tasks=list(tasks), out=tmp / "x", method="magic")
    with pytest.raises(wemoe.WemoeError, match="lambda must be a finite number"):
        wemoe.merge(base=base, tasks=list(tasks), out=tmp / "x", lam=float("nan"))
    assert not (tmp / "x").exists()
