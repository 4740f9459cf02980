"""What every output records so a result can be reproduced and traced: the
inputs (with sha256), parameters, seed, architecture, and package versions."""

from __future__ import annotations

import platform
from typing import Any

import torch

from wemoe._version import __version__
from wemoe.checkpoints.inputs import MergeInputs
from wemoe.core.runtime import dtype_name
from wemoe.outputs.artifact import FORMAT, format_version


def versions() -> dict[str, str]:
    import numpy
    import safetensors

    return {
        "wemoe": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def base_config(inputs: MergeInputs, method: str, parameters: dict[str, Any], dtype: torch.dtype, seed: int, kind: str = "plain") -> dict[str, Any]:
    """The record every output starts from; ``kind`` ("plain" or "moe") sets its format version."""
    base = inputs.base
    return {
        "format": FORMAT,
        "format_version": format_version(kind),
        "method": method,
        "parameters": parameters,
        "architecture": base.arch.to_dict(),
        "scheme": base.scheme,
        "prefix": base.prefix,
        "activation": base.arch.activation,
        "tasks": inputs.task_names,
        "dtype": dtype_name(dtype),
        "seed": seed,
        "inputs": {
            "base": {"path": str(base.path), "sha256": inputs.base_sha256, "scheme": base.scheme},
            "tasks": {t.name: {"path": str(t.path), "sha256": t.sha256, "scheme": t.checkpoint.scheme} for t in inputs.tasks},
        },
        "versions": versions(),
    }
