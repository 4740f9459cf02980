"""``wemoe inspect`` reads as text: size against a plain model, experts, routing, rank and energy,
router, adaptation in one line, an export without its routing numbers; ``--json`` for the raw record."""

from __future__ import annotations

import json
import re

import pytest

from cli_helpers import merge_cli, run_cli
from clip_factories import two_tasks_on_a_folder


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    base, tasks, data, heads = two_tasks_on_a_folder(tmp)
    return tmp, base, tasks, data, heads


def _merge(capsys, outputs, name, *extra):
    tmp, base, tasks, data, heads = outputs
    out = tmp / name
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", out, "--steps", "1", "--batch-size", "2", *extra, heads=heads, data=[data, data])
    assert code == 0, err
    return out


def test_low_rank_moe_reads_as_text(outputs, capsys):
    out = _merge(capsys, outputs, "rank", "--experts", "mlp,attn", "--expert-rank", "4")
    code, text, err = run_cli(capsys, "inspect", out)
    assert code == 0, err
    fields = dict(line.split(":", 1) for line in text.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert "a plain model of this architecture has" in fields["parameters"] and fields["parameters"].endswith("x)")
    assert "a plain model in float32" in fields["file size"]
    assert fields["experts"].startswith("2 (t0, t1)") and "rank-4 SVD factors" in fields["experts"]
    assert fields["routed groups"] == "attn,mlp in blocks 0, 1 (4 routed groups)"
    assert fields["rank"] == "4" and "of each task vector's squared norm" in fields["energy kept"]
    assert fields["router"].startswith("mlp") and "lambda 0.3" in fields["router"]
    assert fields["adaptation"].startswith("1 steps on 4+4 unlabeled images of 2 task(s)") and "loss" in fields["adaptation"]
    assert "{" not in text and "'data'" not in text  # no raw Python dicts
    assert fields["heads"] == "t0, t1"


def test_dense_moe_export_and_json(outputs, capsys):
    tmp = outputs[0]
    out = _merge(capsys, outputs, "dense")
    code, text, err = run_cli(capsys, "inspect", out)
    assert code == 0, err
    assert "dense task vectors" in text and "energy kept" not in text and "routed groups: mlp in blocks 0, 1 (2 routed groups)" in text
    exported = tmp / "exported"
    code, _, err = run_cli(capsys, "export", out, "--task", "t0", "--out", exported, "-q")
    assert code == 0, err
    code, text, err = run_cli(capsys, "inspect", exported)
    assert code == 0, err
    assert re.search(r"^mean routing:  \S", text, re.M) and not re.search(r"\d\.\d{4,}", text)  # a summary, not raw floats
    assert "heads:         t0" in text
    code, raw, err = run_cli(capsys, "inspect", exported, "--json")
    assert code == 0, err
    record = json.loads(raw)
    assert record["method"] == "wemoe-export" and isinstance(record["parameters"]["mean_routing"], list)
    code, raw, err = run_cli(capsys, "inspect", out, "--json")
    assert code == 0, err
    assert json.loads(raw)["wemoe"]["adaptation"]["steps"] == 1


def test_plain_checkpoint_json(outputs, capsys):
    _, base, _, _, _ = outputs
    code, raw, err = run_cli(capsys, "inspect", base, "--json")
    assert code == 0, err
    record = json.loads(raw)
    assert record["scheme"] == "open_clip" and record["architecture"]["depth"] == 2 and record["parameters"] > 0
