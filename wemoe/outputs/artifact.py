"""A wemoe output directory: what it holds, how it is written, how its record is read.

Every command that writes (``merge``, ``export``) writes through
:func:`write_output`; every command that reads one (``load``, ``eval``,
``inspect``, ``export``, ``routes``) asks :func:`read_output`, which decides once
whether a directory is a wemoe output and returns its typed, validated record.

Layout::

    model.safetensors           (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    config.json                 the record: format, version, method, parameters, architecture, inputs...
    heads.safetensors           the task heads, when given
    report.json                 timings and curves: the one file that differs between identical runs
    README.md                   the model card, rendered from the record (``wemoe.outputs.model_card``)

A plain output in the Hugging Face layout is a transformers model folder: there
config.json is the model's own (``wemoe.outputs.hf_config``) and the record moves to
``wemoe.json``. Outputs whose config.json is the record stay readable as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wemoe.core.arch import ViTArch
from wemoe.core.runtime import parse_dtype
from wemoe.errors import WemoeError
from wemoe.io.output import Entry, config_metadata, write_json, write_model
from wemoe.model.heads import save_heads
from wemoe.outputs.layout import CONFIG_FILE, FORMAT, HEADS_FILE, MOE_SECTION, RECORD_FILE, REPORT_FILE
from wemoe.outputs.model_card import write_card
from wemoe.outputs.record_checks import MAX_RECORD_BYTES, check_record, parse_record

# Format versions by kind of output: plain checkpoints are unchanged since version 1; mixture-of-experts
# checkpoints are at 2 (routed linears, wemoe 0.2), and version 1 ones (MLP-only keys, wemoe 0.1) are still read.
FORMAT_VERSIONS = {"plain": 1, "moe": 2}
FORMAT_VERSION = max(FORMAT_VERSIONS.values())


def format_version(kind: str) -> int:
    """The format version an output of ``kind`` ("plain" or "moe") is written at."""
    return FORMAT_VERSIONS[kind]


def write_output(
    directory: Path,
    config: dict[str, Any],
    entries: list[Entry],
    produce: Callable[[], Iterable[tuple[str, torch.Tensor]]],
    heads: Mapping[str, Any] | None = None,
    report: Callable[[], dict[str, Any]] | None = None,
    shard_size: int | None = None,
    model_config: Mapping[str, Any] | None = None,
    summary: str = "",
) -> list[str]:
    """Write model file(s), heads, the record, report.json and the model card into ``directory`` (a temporary one).

    ``report`` is called after the model is written (so its timings include the writing).
    ``model_config``: the model's own config.json (a transformers folder); the record then goes to wemoe.json.
    ``summary``: what the method is, in one line, for the model card.
    """
    files = write_model(directory, entries, produce, config_metadata(config), shard_size)
    if heads:
        save_heads(directory / HEADS_FILE, heads)
    if model_config is not None:
        write_json(directory / CONFIG_FILE, model_config)
        write_json(directory / RECORD_FILE, config)
    else:
        write_json(directory / CONFIG_FILE, config)
    if report is not None:
        write_json(directory / REPORT_FILE, {"files": files, **report()})
    write_card(directory, config, summary)
    return files


def write_module(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    config: dict[str, Any],
    dtype: torch.dtype | None,
    shard_size: int | None,
    heads: Mapping[str, Any] | None = None,
    report: Callable[[], dict[str, Any]] | None = None,
    summary: str = "",
) -> list[str]:
    """Write a module's whole state (a mixture of experts) under its module paths, cast to ``dtype``."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if (dtype is not None and t.is_floating_point()) else t

    entries = [(k, cast(v).dtype, tuple(v.shape)) for k, v in state.items()]
    produce = lambda: ((k, cast(v).contiguous()) for k, v in state.items())
    return write_output(directory, config, entries, produce, heads=heads, report=report, shard_size=shard_size, summary=summary)


@dataclass(frozen=True)
class OutputRecord:
    """config.json of a wemoe output, validated."""

    path: Path
    raw: dict[str, Any]
    format_version: int
    method: str
    architecture: ViTArch
    scheme: str
    prefix: str
    tasks: list[str]
    dtype: str
    parameters: dict[str, Any]

    @property
    def is_moe(self) -> bool:
        """A mixture-of-experts module (rebuilt by ``wemoe.load``), not a plain checkpoint."""
        return isinstance(self.raw.get(MOE_SECTION), dict)

    @property
    def method_section(self) -> dict[str, Any]:
        """The method's own record: the mixture's description for a mixture of experts, else the section under its name."""
        value = self.raw.get(MOE_SECTION if self.is_moe else self.method)
        return value if isinstance(value, dict) else {}

    def section(self, name: str) -> dict[str, Any]:
        value = self.raw.get(name)
        if not isinstance(value, dict):
            raise WemoeError(f"{self.record_file.name} has no '{name}' section", path=self.path)
        return value

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype) or torch.float32

    @property
    def record_file(self) -> Path:
        """wemoe.json when config.json is the model's own, else config.json."""
        own = self.path / RECORD_FILE
        return own if own.is_file() else self.path / CONFIG_FILE

    @property
    def heads_path(self) -> Path | None:
        p = self.path / HEADS_FILE
        return p if p.is_file() else None


def _field(cfg: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, name: str = CONFIG_FILE) -> Any:
    value = cfg.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise WemoeError(f"{name}: '{key}' is missing or of the wrong type", path=path)
    return value


def read_output(path: str | Path) -> OutputRecord | None:
    """The record of a wemoe output directory; None when ``path`` is not one (another checkpoint).

    The record is wemoe.json when present (config.json is then the model's own), else config.json.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    cfg_path = p / RECORD_FILE if (p / RECORD_FILE).is_file() else p / CONFIG_FILE
    if not cfg_path.is_file():
        return None
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            raise WemoeError(f"{cfg_path.name} is larger than {MAX_RECORD_BYTES >> 20} MiB; no record is", path=p)
        cfg = parse_record(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WemoeError(f"cannot read {cfg_path.name} ({str(exc)[:200]})", path=p) from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        if cfg_path.name == RECORD_FILE:
            raise WemoeError(f'{RECORD_FILE} is not a wemoe record (no "format": "{FORMAT}")', path=p)
        return None  # e.g. a Hugging Face model folder
    name = cfg_path.name
    check_record(cfg, p, name)  # schema and ranges before any field is used
    version = _field(cfg, "format_version", int, p, name)
    if version > format_version("moe" if isinstance(cfg.get(MOE_SECTION), dict) else "plain"):
        raise WemoeError(f"format version {version} is newer than this wemoe understands; upgrade wemoe", path=p)
    arch = ViTArch.from_dict(_field(cfg, "architecture", dict, p, name), source=f"wemoe {name}")
    tasks = _field(cfg, "tasks", list, p, name)
    if not all(isinstance(t, str) for t in tasks):
        raise WemoeError(f"{name}: 'tasks' must be a list of names", path=p)
    return OutputRecord(
        path=p,
        raw=cfg,
        format_version=version,
        method=_field(cfg, "method", str, p, name),
        architecture=arch,
        scheme=_field(cfg, "scheme", str, p, name),
        prefix=cfg.get("prefix") or "",
        tasks=list(tasks),
        dtype=cfg.get("dtype") or "float32",
        parameters=cfg.get("parameters") or {},
    )


def require_output(path: str | Path, moe: bool | None = None) -> OutputRecord:
    """The record of ``path``, refusing anything else (and a plain output where a MoE one is needed)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise WemoeError(f"a wemoe output is named by a path (str or os.PathLike), got {type(path).__name__}")
    if not Path(path).exists():
        raise WemoeError("does not exist", path=path)
    record = read_output(path)
    if record is None:
        raise WemoeError(f"not a wemoe output directory (no {RECORD_FILE} and no wemoe {CONFIG_FILE})", path=path)
    if moe is True and not record.is_moe:
        raise WemoeError(f"a {record.method} output is a plain checkpoint, not a mixture of experts", path=path)
    return record


__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "HEADS_FILE",
    "MOE_SECTION",
    "RECORD_FILE",
    "OutputRecord",
    "REPORT_FILE",
    "read_output",
    "require_output",
    "format_version",
    "write_module",
    "write_output",
]
