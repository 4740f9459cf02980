"""Where and in what precision to compute: the names users type and what torch needs."""

from __future__ import annotations

import torch

from wemoe.errors import WemoeError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise WemoeError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_device(spec: str) -> str:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is refused."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec not in DEVICES:
        raise WemoeError(f"device must be one of {', '.join(DEVICES)}, got {spec!r}")
    if spec == "cuda" and not torch.cuda.is_available():
        raise WemoeError("--device cuda was asked for but no CUDA device is available")
    return spec
