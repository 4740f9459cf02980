"""Shared CLI plumbing: multi-value options, device/dtype, verbosity, YAML configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
import torch

from wemoe.errors import WemoeError

GREEDY_OPTIONS = ("--tasks", "--heads", "--data", "--task")


def expand_greedy(args: list[str], greedy: tuple[str, ...]) -> list[str]:
    """Let ``--tasks a=x b=y`` mean ``--tasks a=x --tasks b=y``: values run to the next option.

    A greedy flag followed by no value is dropped, so "no tasks given" is
    reported as such rather than as the next option being taken for a value.
    """
    out: list[str] = []
    current: str | None = None
    for arg in args:
        if arg.startswith("-") and len(arg) > 1:
            current = arg if arg in greedy else None
            if current is None:
                out.append(arg)
            continue
        if current is not None:
            out.append(current)
        out.append(arg)
    return out


def resolve_device(spec: str) -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and not torch.cuda.is_available():
        raise WemoeError("--device cuda was asked for but no CUDA device is available")
    return spec


def parse_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def device_option(fn: Callable) -> Callable:
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where to compute.")(fn)


def verbosity_options(fn: Callable) -> Callable:
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")(fn)
    fn = click.option("-v", "--verbose", count=True, help="More detail.")(fn)
    return fn


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise WemoeError(f"cannot read config ({exc.strerror})", path=path) from None
    except yaml.YAMLError as exc:
        raise WemoeError(f"invalid YAML ({str(exc).splitlines()[0]})", path=path) from None
    if not isinstance(data, dict):
        raise WemoeError("config must be a YAML mapping", path=path)
    return data


def _rel(base_dir: Path, value: Any) -> str:
    if value is None or value == "":
        return ""
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else base_dir / p)


MERGE_KEYS = {
    "base": "base", "method": "method", "out": "out", "lambda": "lam", "ties_k": "ties_k", "arch": "arch",
    "dtype": "dtype", "seed": "seed", "steps": "steps", "lr": "lr", "batch_size": "batch_size", "cosine": "cosine",
    "moe_blocks": "moe_blocks", "router_layers": "router_layers", "coef_range": "coef_range", "shard_size": "shard_size",
}
PATH_KEYS = {"base", "out", "arch"}
FLOAT_KEYS = {"lambda", "ties_k", "lr"}
INT_KEYS = {"seed", "steps", "batch_size", "router_layers"}
CHOICES = {"method": ("average", "task-arithmetic", "ties", "wemoe"), "dtype": ("float32", "bfloat16", "float16")}


def _typed(key: str, value: Any, path: str) -> Any:
    """A YAML value checked as the matching command-line flag would check it."""
    if value is None:
        return None
    flag = "--" + key.replace("_", "-")
    if key in FLOAT_KEYS and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            pass
        raise WemoeError(f"'{key}' must be a number, got {value!r}", path=path)
    if key in INT_KEYS:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise WemoeError(f"'{key}' must be an integer, got {value!r}", path=path)
    if key == "cosine":
        if isinstance(value, bool):
            return value
        raise WemoeError(f"'{key}' must be true or false, got {value!r}", path=path)
    if key in CHOICES and value not in CHOICES[key]:
        raise WemoeError(f"'{key}' must be one of {', '.join(CHOICES[key])} (as {flag}), got {value!r}", path=path)
    if key in ("moe_blocks", "coef_range") and isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)  # [0, 3, 5] means 0,3,5
    if isinstance(value, (dict, list, bool)):
        raise WemoeError(f"'{key}' must be a single value, got {value!r}", path=path)
    return value


def apply_config(opts: dict[str, Any], command: str) -> dict[str, Any]:
    """Fill options the user did not give on the command line from ``--config``.

    Relative paths in the YAML are relative to the YAML file. Layout::

        base: ckpt/base.safetensors
        method: wemoe
        out: merged/
        lambda: 0.3
        steps: 1000
        tasks:
          mnist: {checkpoint: ckpt/mnist.safetensors, head: heads/mnist.safetensors, data: data/mnist.npz}
        eval: {model: merged/, batch_size: 64}
    """
    path = opts.pop("config_path", None)
    if not path:
        return opts
    cfg = _load_yaml(path)
    here = Path(path).resolve().parent
    tasks = cfg.get("tasks") or {}
    if not isinstance(tasks, dict):
        raise WemoeError("'tasks' must map task names to {checkpoint, head, data}", path=path)
    for name, spec in tasks.items():
        if not isinstance(spec, dict):
            raise WemoeError(f"task '{name}' must be a mapping with checkpoint/head/data", path=path)
        unknown = set(spec) - {"checkpoint", "head", "data"}
        if unknown:
            raise WemoeError(f"task '{name}' has unknown field(s) {sorted(unknown)}", path=path)
    known = set(MERGE_KEYS) | {"tasks", "eval"}
    unknown = set(cfg) - known
    if unknown:
        raise WemoeError(f"unknown config key(s): {', '.join(sorted(unknown))}", path=path)

    if command == "merge":
        for key, opt in MERGE_KEYS.items():
            if key in cfg and opts.get(opt) in (None, ()):
                value = _typed(key, cfg[key], path)
                opts[opt] = _rel(here, value) if key in PATH_KEYS else value
        for opt, field in (("tasks", "checkpoint"), ("heads", "head"), ("data", "data")):
            if opt == "data" and opts.get("method") != "wemoe":
                continue  # the tasks' data serves `eval --config`; static merges take none
            if not opts.get(opt):
                opts[opt] = tuple(f"{n}={_rel(here, s[field])}" for n, s in tasks.items() if s.get(field))
    else:
        ev = cfg.get("eval") or {}
        if not isinstance(ev, dict):
            raise WemoeError("'eval' must be a mapping (model, batch_size)", path=path)
        if ev.get("batch_size") is not None and (_typed("batch_size", ev["batch_size"], path) < 1):
            raise WemoeError(f"'eval.batch_size' must be >= 1, got {ev['batch_size']}", path=path)
        if not opts.get("model"):
            model = ev.get("model", cfg.get("out"))
            opts["model"] = _rel(here, model) if model else None
        if ev.get("batch_size") and opts.get("batch_size") in (None, 64):
            opts["batch_size"] = ev["batch_size"]
        if not opts.get("tasks"):
            opts["tasks"] = tuple(f"{n}={_rel(here, s.get('head', ''))}:{_rel(here, s['data'])}" for n, s in tasks.items() if s.get("data"))
    return opts


def progress_enabled(opts: dict[str, Any]) -> bool:
    return not opts.get("quiet")


def echo_note(opts: dict[str, Any], message: str) -> None:
    if not opts.get("quiet"):
        click.echo(message, err=True)


