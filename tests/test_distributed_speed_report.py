"""The multi-process benchmark times steps without the warm-up and reports what it did not measure."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
from benchmarks.distributed_speed import median_interval, report_md


def test_step_time_is_the_median_interval_so_the_first_step_does_not_count() -> None:
    assert median_interval([0.0, 10.0, 11.0, 12.5]) == 1.5  # one slow interval (10 s) does not move the median
    assert median_interval([0.0, 2.0, 3.0, 4.0, 5.0]) == 1.0
    with pytest.raises(RuntimeError, match="--steps 2 or more"):
        median_interval([5.0])  # one step: its time is all warm-up


def test_report_gives_speed_ups_against_the_first_row_and_says_when_no_gpu_was_measured() -> None:
    run = {"processes": 1, "device": "cpu", "threads_per_process": 2, "adapt_s": 9.0, "build_s": 1.0, "wall_s": 20.0}
    result = {
        "arch": "ViT-B-32-quickgelu",
        "experts": 8,
        "per_task": 16,
        "steps": 4,
        "machine": "test CPU, AVX2, 2 cores",
        "torch": "2.x",
        "command": "python -m benchmarks.distributed_speed",
        "runs": [
            {**run, "label": "1 process, CPU", "step_s": 36.0},
            {**run, "label": "2 processes (torchrun), CPU", "processes": 2, "threads_per_process": 1, "step_s": 24.0},
        ],
        "router_max_abs_diff": 3e-8,
        "gpu": "not measured (no CUDA device on this machine)",
    }
    md = report_md(result)
    assert "| 2 processes (torchrun), CPU | 2 | cpu | 1 | 24.000 | 1.50x | 20.0 |" in md
    assert "GPU: not measured (no CUDA device on this machine)." in md
    assert "test CPU, AVX2, 2 cores" in md and "3.0e-08" in md
