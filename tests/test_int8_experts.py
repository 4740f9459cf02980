"""Low-rank experts stored in 8 bits (``--expert-dtype int8``) against the float32 factors they quantize."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import wemoe
from wemoe.moe.experts.int8 import dequantize_rows, quantize_rows

from cli_helpers import assert_one_line_error, merge_cli, run_cli
from factories import zoo


def test_row_quantization_error_is_at_most_half_a_step():
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 5)[None, :, None]
    x[0, 0] = 0.0  # an all-zero row stays zero
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 5, 1) and q.abs().max().item() == 127
    back = dequantize_rows(q, scale)
    assert torch.all((back - x).abs() <= scale / 2 + 1e-7)
    assert torch.equal(back[0, 0], torch.zeros(40))


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    base, tasks, _, _ = zoo(tmp, tasks=3)
    return tmp, base, tasks


def _merge(capsys, merged, name, *extra):
    tmp, base, tasks = merged
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / name, "--experts", "mlp,attn", "--expert-rank", "8", *extra)
    assert code == 0, err
    return tmp / name


def test_int8_store_is_the_float_store_quantized(merged, capsys):
    f32 = _merge(capsys, merged, "f32")
    i8 = _merge(capsys, merged, "i8", "--expert-dtype", "int8")
    cfg = json.loads((i8 / "config.json").read_text())
    assert cfg["wemoe"]["expert_dtype"] == "int8" and cfg["parameters"]["expert_dtype"] == "int8"
    assert "expert_dtype" not in json.loads((f32 / "config.json").read_text())["wemoe"]
    with safe_open(str(i8 / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert any(k.endswith("experts.down_q") for k in keys) and not any(k.endswith("experts.down") for k in keys)
        assert all(f.get_tensor(k).dtype == torch.int8 for k in keys if k.endswith(("_q",)))
    a, b = wemoe.load(f32), wemoe.load(i8)
    down_f, up_f = a.blocks[1].mlp.fc1.experts.down, a.blocks[1].mlp.fc1.experts.up
    down_q, up_q = b.blocks[1].mlp.fc1.experts.factors()
    assert torch.equal(down_q, dequantize_rows(*quantize_rows(down_f))) and torch.equal(up_q, dequantize_rows(*quantize_rows(up_f)))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert ((ya - yb).abs().max() / ya.abs().max()).item() < 1e-2
    factor_bytes = lambda p: sum(t.numel() * t.element_size() for n, t in wemoe.load(p).state_dict().items() if ".experts.down" in n or ".experts.up" in n)
    assert factor_bytes(i8) < 0.3 * factor_bytes(f32)  # int8 values plus one float32 scale per row


def test_int8_model_exports_and_reloads_in_a_fresh_load(merged, capsys):
    i8 = _merge(capsys, merged, "i8b", "--expert-dtype", "int8", "--dtype", "bfloat16")
    model = wemoe.load(i8)
    assert model.blocks[0].attn.qkv.experts.down_q.dtype == torch.int8
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(model(x).float()).all()
    code, out, err = run_cli(capsys, "inspect", i8)
    assert code == 0, err
    assert "int8" in out


def test_int8_needs_low_rank_experts(merged, capsys):
    tmp, base, tasks = merged
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "bad", "--expert-dtype", "int8")
    assert_one_line_error(code, err, "--expert-dtype")
    assert not (tmp / "bad").exists()
    code, _, err = merge_cli(capsys, base, tasks, "wemoe", tmp / "bad", "--expert-rank", "4", "--expert-dtype", "int4")
    assert_one_line_error(code, err, "--expert-dtype", "float32", "int8")
