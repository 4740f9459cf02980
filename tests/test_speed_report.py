"""The speed report states each shortfall's arithmetic correctly and names its machine."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
from benchmarks.speed import machine_description, report_md, shortfall_notes

RESULT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "speed_xeon-avx512.json"


def _result(naive_vs_plain: float, wemoe_vs_plain: float) -> dict:
    r = copy.deepcopy(json.loads(RESULT.read_text()))
    b = r["inference"]
    b["plain_s"] = 1.0
    b["wemoe_s"] = wemoe_vs_plain
    b["naive_s_scaled"] = b["naive_loop_s_scaled"] = naive_vs_plain
    b["naive_einsum_s_scaled"] = naive_vs_plain * 2
    r["ratios"].update(forward_vs_naive=naive_vs_plain / wemoe_vs_plain, forward_vs_plain=wemoe_vs_plain)
    return r


def test_naive_note_says_faster_than_plain_only_when_that_is_what_10x_needs() -> None:
    cheap_loop = " ".join(shortfall_notes(_result(naive_vs_plain=5.5, wemoe_vs_plain=1.7)))
    assert "10x would need WEMoE at 0.55x the plain model, i.e. faster than the model it extends" in cheap_loop
    dear_loop = " ".join(shortfall_notes(_result(naive_vs_plain=18.0, wemoe_vs_plain=2.34)))
    assert "10x would need WEMoE at 1.80x the plain model, while it runs at 2.34x" in dear_loop
    assert "faster than the model it extends" not in dear_loop


def test_goal_met_gives_no_shortfall_note() -> None:
    notes = " ".join(shortfall_notes(_result(naive_vs_plain=20.0, wemoe_vs_plain=1.5)))
    assert "Less than 10x" not in notes and "Forward above 2x" not in notes


def test_report_names_the_machine() -> None:
    r = _result(naive_vs_plain=20.0, wemoe_vs_plain=1.5)
    r["machine"] = machine_description()
    assert f"Machine: {r['machine']}." in report_md(r)
    assert r["machine"].endswith("cores")
    del r["machine"]
    assert "Machine: not recorded" in report_md(r)


@pytest.mark.parametrize(
    "description,tag",
    [("Intel(R) Xeon(R) Processor, AVX-512, 2 cores", "xeon-avx512"), ("AMD EPYC, AVX2, 2 cores", "epyc-avx2"), ("Some CPU, no AVX2, 4 cores", "cpu-noavx2")],
)
def test_result_files_are_named_by_machine(description: str, tag: str) -> None:
    from benchmarks.speed import machine_tag

    assert machine_tag(description) == tag


def test_sign_mask_store_is_named_in_the_report() -> None:
    from benchmarks.speed.report import config_label

    r = _result(naive_vs_plain=20.0, wemoe_vs_plain=1.5)
    r.update(routed="all", expert_store="sign-mask", expert_density=0.1, small_experts="compressed")
    label = config_label(r)
    assert "sign-mask store (density 0.1), compressed patch-embedding and projection experts" in label
    assert label in report_md(r)
