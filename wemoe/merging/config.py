"""One typed merge configuration behind the CLI, YAML files and ``wemoe.merge``.

Every way of asking for a merge ends in :func:`merge_config`: values given
directly (flags, keyword arguments) win over a YAML file's, which win over the
defaults. The method's parameters are resolved by the registry
(:func:`wemoe.methods.build_params`), so ranges and "applies only to" rules are
checked in one place whatever the front end.

YAML layout (paths relative to the file)::

    base: ckpt/base.safetensors
    method: wemoe
    out: merged/
    lambda: 0.3            # any parameter of the method, under its key
    tasks:
      mnist: {checkpoint: ckpt/mnist.safetensors, head: heads/mnist.safetensors, data: data/mnist.npz}
    eval: {model: merged/, batch_size: 64}
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wemoe.clip.zeroshot import CLIP_SOURCE, is_clip_source
from wemoe.core.arch import KNOWN_ARCHS
from wemoe.core.runtime import DEVICES, DTYPES
from wemoe.core.tasks import TaskSpec, check_unique, split_named
from wemoe.errors import UsageError, WemoeError
from wemoe.methods import REGISTRY, all_params, build_params, get_method

DEFAULT_METHOD = "task-arithmetic"
DEFAULT_SHARD_SIZE = "4GB"
# top-level YAML keys that are not method parameters
COMMON_KEYS = ("base", "method", "out", "arch", "dtype", "seed", "shard_size")
TASK_FIELDS = ("checkpoint", "head", "data")
MAX_SEED = 2**32 - 1  # numpy and torch generators take it; seed + k stays in range


@dataclass
class MergeConfig:
    base: str
    tasks: list[TaskSpec]
    method: str
    params: Any  # the method's Params dataclass
    out: str | None = None
    arch: str | None = None
    dtype: str | None = None
    shard_size: str = DEFAULT_SHARD_SIZE
    seed: int = 0
    device: str = "auto"
    force: bool = False
    dry_run: bool = False
    quiet: bool = False
    verbose: int = 0
    config_path: str | None = None  # the YAML file it was read from, if any
    # how each parameter was given, for error messages ("--lr" on the CLI, "'lr'" in YAML)
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def inputs(self) -> list[str]:
        """Every file or folder the merge reads: the output may be none of them, hold one or lie inside one."""
        paths = [self.config_path, self.base, self.arch]
        for t in self.tasks:
            paths += [t.checkpoint, t.head, t.data]
        return [p for p in paths if p]


# ---------------------------------------------------------------- YAML
MAX_YAML_BYTES = 1 << 20  # a merge config is a few hundred bytes
MAX_YAML_VALUES = 10_000  # values after aliases are expanded: an alias bomb is refused before anything walks it


def _count_values(data: Any, limit: int) -> int:
    """How many values ``data`` holds with aliases expanded, counting no further than ``limit`` + 1."""
    count, stack = 0, [data]
    while stack and count <= limit:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise WemoeError(f"config is larger than {MAX_YAML_BYTES // 1024} KiB; a merge config is a few lines", path=path)
        data = yaml.safe_load(raw)
    except OSError as exc:
        raise WemoeError(f"cannot read config ({exc.strerror})", path=path) from None
    except yaml.YAMLError as exc:
        raise WemoeError(f"invalid YAML ({str(exc).splitlines()[0][:200]})", path=path) from None
    except RecursionError:
        raise WemoeError("invalid YAML (nested too deeply)", path=path) from None
    except (ValueError, OverflowError) as exc:  # a timestamp or number PyYAML cannot build
        raise WemoeError(f"invalid YAML ({type(exc).__name__}: {str(exc)[:200]})", path=path) from None
    if not isinstance(data, dict):
        raise WemoeError("config must be a YAML mapping", path=path)
    if _count_values(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise WemoeError(f"config holds more than {MAX_YAML_VALUES} values once its aliases are expanded (an alias bomb?)", path=path)
    return data


def relative_to(base_dir: Path, value: Any) -> str:
    """A path from a YAML file, taken relative to the file's directory."""
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else base_dir / p)


def _arch_value(base_dir: Path, value: Any) -> str:
    return str(value) if str(value) in KNOWN_ARCHS else relative_to(base_dir, value)


def yaml_tasks(cfg: Mapping[str, Any], path: str | Path) -> dict[str, dict[str, str]]:
    """``tasks:`` of a YAML config, validated, with paths made absolute."""
    here = Path(path).resolve().parent
    tasks = cfg.get("tasks") or {}
    if not isinstance(tasks, dict):
        raise WemoeError("'tasks' must map task names to {checkpoint, head, data}", path=path)
    out: dict[str, dict[str, str]] = {}
    for name, spec in tasks.items():
        if not isinstance(spec, dict):
            raise WemoeError(f"task '{name}' must be a mapping with checkpoint/head/data", path=path)
        unknown = set(spec) - set(TASK_FIELDS)
        if unknown:
            raise WemoeError(f"task '{name}' has unknown field(s) {reprlib.repr(sorted(str(k) for k in unknown))}", path=path)
        out[str(name)] = {f: _task_path(here, f, spec[f]) for f in TASK_FIELDS if spec.get(f) not in (None, "")}
    return out


def _task_path(here: Path, field: str, value: Any) -> str:
    """A task's path from YAML, relative to the file; a ``clip:PATH`` head keeps its prefix."""
    if field == "head" and is_clip_source(str(value)):
        return CLIP_SOURCE + relative_to(here, str(value)[len(CLIP_SOURCE) :])
    return relative_to(here, value)


def _check_yaml_keys(cfg: Mapping[str, Any], path: str | Path) -> None:
    known = set(COMMON_KEYS) | set(all_params()) | {"tasks", "eval"}
    unknown = set(cfg) - known
    if unknown:
        raise WemoeError(f"unknown config key(s): {reprlib.repr(sorted(str(k) for k in unknown))}", path=path)


# ---------------------------------------------------------------- typed values
def _kind(value: Any) -> str:
    """A value's type and a bounded glimpse of it, for messages (never the whole of a huge value)."""
    return f"{type(value).__name__} {reprlib.repr(value)}"


def path_value(value: Any, what: str) -> str | None:
    """A path given as str or os.PathLike (None: not given); anything else is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{what} must be a path (str or os.PathLike), got {_kind(value)}")
    return os.fspath(value) if not isinstance(value, str) else value


def flag_value(value: Any, what: str) -> bool:
    """A yes/no option: only True, False (or None, not given); "no" is not False."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise UsageError(f"{what} must be True or False, got {_kind(value)}")
    return value


# ---------------------------------------------------------------- named values
def named_paths(value: Mapping[str, Any] | Sequence[Any] | None, what: str) -> dict[str, str]:
    """Tasks, heads or data as ``{name: path}`` from a mapping, ``NAME=PATH`` strings or bare paths."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        pairs = [(_name(k, what), path_value(v, f"{what} of task '{k}'")) for k, v in value.items()]
    elif isinstance(value, (str, os.PathLike)):
        pairs = [split_named(os.fspath(value))]
    elif isinstance(value, (list, tuple)):
        pairs = [split_named(path_value(v, what) or _missing(what)) for v in value]
    else:
        raise UsageError(f"{what}s must be a mapping of task names to paths or a list of paths, got {_kind(value)}")
    check_unique([n for n, _ in pairs], f"{what} for task", [v for _, v in pairs])
    return dict(pairs)


def _missing(what: str) -> str:
    raise UsageError(f"a {what} path is None")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"task names of {what}s must be non-empty strings, got {_kind(value)}")
    return value


def shared_heads(value: Mapping[str, Any] | Sequence[Any] | None, task_names: Sequence[str]) -> Mapping[str, Any] | Sequence[Any] | None:
    """``--heads clip:PATH`` without a name: a zero-shot head from that CLIP checkpoint for every task given no other head."""
    if value is None or isinstance(value, Mapping):
        return value
    if not isinstance(value, (str, os.PathLike, list, tuple)):
        raise UsageError(f"heads must be a mapping of task names to paths or a list of paths, got {_kind(value)}")
    values = [str(v) for v in ([value] if isinstance(value, (str, os.PathLike)) else value)]
    shared = [v for v in values if is_clip_source(v)]
    named = [v for v in values if not is_clip_source(v)]
    if len(shared) > 1:
        raise WemoeError(f"--heads names more than one CLIP checkpoint for every task ({', '.join(shared)})")
    given = {split_named(v)[0] for v in named}
    return named + [f"{n}={shared[0]}" for n in task_names if shared and n not in given]


def _check_clip_heads(specs: Sequence[TaskSpec], method: str, adapts: bool) -> None:
    """A ``clip:`` head takes its class names from the task's data, so it needs ``--data``."""
    for spec in specs:
        if is_clip_source(spec.head) and not spec.data:
            reason = f"give --data {spec.name}=PATH" if adapts else f"--method {method} takes no --data: build the head with `wemoe heads` first"
            raise UsageError(f"--heads {spec.name}={spec.head}: {CLIP_SOURCE} heads take the class names from the task's data; {reason}")


def _per_task(paths: dict[str, str], task_names: Sequence[str], flag: str) -> dict[str, str]:
    for name in paths:
        if name not in task_names:
            raise WemoeError(f"{flag} names task '{name}', which is not among --tasks ({', '.join(task_names)})")
    return paths


# ---------------------------------------------------------------- resolution
def merge_config(config: str | Path | None = None, **given: Any) -> MergeConfig:
    """Resolve a merge configuration: ``given`` (None = not given) over ``config`` (YAML) over defaults.

    ``given`` takes the common options (base, tasks, heads, data, method, out, arch,
    dtype, shard_size, seed, device, force, dry_run, quiet, verbose) and the
    method's parameters under their keys (``lambda``, ``steps``...) or field names
    (``lam``). ``tasks``/``heads``/``data`` may be mappings, lists of paths or
    ``NAME=PATH`` strings. Nothing is read but the YAML file.
    """
    origins: dict[str, str] = {}
    yaml_cfg: dict[str, Any] = {}
    yaml_task_specs: dict[str, dict[str, str]] = {}
    here = Path(".")
    config = path_value(config, "config")
    for key in ("base", "out", "arch"):
        given[key] = path_value(given.get(key), key)
    for key in ("force", "dry_run", "quiet"):
        given[key] = flag_value(given.get(key), key)
    if config is not None:
        yaml_cfg = load_yaml(config)
        _check_yaml_keys(yaml_cfg, config)
        yaml_task_specs = yaml_tasks(yaml_cfg, config)
        here = Path(config).resolve().parent

    def pick(key: str, default: Any = None, path_like: bool = False) -> Any:
        """A common option: given > YAML (paths relative to the file) > default."""
        if given.get(key) is not None:
            return given[key]
        value = yaml_cfg.get(key)
        if value is None:
            return default
        origins[key] = f"'{key}' in {Path(str(config)).name}"
        return relative_to(here, value) if path_like else value

    method = pick("method", DEFAULT_METHOD)
    if not isinstance(method, str):
        raise UsageError(f"method must be a method name, got {_kind(method)}")
    method_cls = get_method(method)
    base = pick("base", path_like=True)
    out = pick("out", path_like=True)
    arch = given.get("arch") if given.get("arch") is not None else (_arch_value(here, yaml_cfg["arch"]) if yaml_cfg.get("arch") else None)

    tasks = named_paths(given.get("tasks"), "checkpoint") or {n: s["checkpoint"] for n, s in yaml_task_specs.items() if "checkpoint" in s}
    names = list(tasks)
    heads = _per_task(named_paths(shared_heads(given.get("heads"), names), "head"), names, "--heads") or {
        n: s["head"] for n, s in yaml_task_specs.items() if "head" in s and n in tasks
    }
    explicit_data = named_paths(given.get("data"), "data")
    if explicit_data and not method_cls.adapts:
        adapting = ", ".join(n for n, c in REGISTRY.items() if c.adapts)
        raise UsageError(f"--data only applies to --method {adapting}")
    if method_cls.adapts:  # a YAML's task data serves `eval --config` for methods that do not adapt
        data = _per_task(explicit_data, names, "--data") or {n: s["data"] for n, s in yaml_task_specs.items() if "data" in s and n in tasks}
    else:
        data = {}
    specs = [TaskSpec(n, tasks[n], heads.get(n), data.get(n)) for n in names]
    _check_clip_heads(specs, method, method_cls.adapts)

    known_params = all_params()
    param_keys = set(known_params)
    aliases = {info.field: key for key, owners in known_params.items() for _, info in owners if info.field != key}
    given = {aliases.get(k, k): v for k, v in given.items()}  # wemoe.merge(lam=0.3) means lambda
    raw: dict[str, Any] = {}
    for key, value in yaml_cfg.items():
        if key in param_keys and value is not None:
            raw[key] = value
            origins[key] = f"'{key}' in {Path(str(config)).name}"
    common = {"base", "tasks", "heads", "data", "method", "out", "arch", "dtype", "shard_size", "seed", "device", "force", "dry_run", "quiet", "verbose"}
    for key, value in given.items():
        if key in common or value is None:
            continue
        raw[key] = value
        origins[key] = "--" + key.replace("_", "-")
    try:
        params = build_params(method, raw, origin=lambda k: origins.get(k, "--" + k.replace("_", "-")))
    except UsageError:
        raise
    except WemoeError as exc:  # a bad parameter value is a usage error (exit 2), wherever it was given
        raise UsageError(str(exc)) from None
    except (OverflowError, ValueError, TypeError) as exc:  # e.g. `.inf` in YAML where an integer belongs
        raise UsageError(f"invalid parameter value ({type(exc).__name__}: {str(exc)[:200]})") from None

    dtype = pick("dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {_kind(dtype)}")
    seed = pick("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"seed must be an integer from 0 to {MAX_SEED} (the random generators' range), got {_kind(seed)}")
    device = given.get("device") if given.get("device") is not None else "auto"
    if not isinstance(device, str) or device not in DEVICES:
        raise UsageError(f"device must be one of {', '.join(DEVICES)}, got {_kind(device)}")
    shard_size = pick("shard_size", DEFAULT_SHARD_SIZE)
    return MergeConfig(
        base=str(base) if base is not None else "",
        tasks=specs,
        method=method,
        params=params,
        out=str(out) if out else None,
        arch=str(arch) if arch else None,
        dtype=dtype,
        shard_size=str(shard_size),
        seed=int(seed),
        device=device,
        force=bool(given.get("force")),
        dry_run=bool(given.get("dry_run")),
        quiet=bool(given.get("quiet")),
        verbose=int(given.get("verbose") or 0),
        config_path=str(config) if config is not None else None,
        origins=origins,
    )


# ---------------------------------------------------------------- eval
def eval_options_from_yaml(opts: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``wemoe eval --config``: model and tasks (HEAD:DATA) from the YAML, flags win."""
    cfg = load_yaml(path)
    _check_yaml_keys(cfg, path)
    here = Path(path).resolve().parent
    specs = yaml_tasks(cfg, path)
    ev = cfg.get("eval") or {}
    if not isinstance(ev, dict):
        raise WemoeError("'eval' must be a mapping (model, batch_size)", path=path)
    batch = ev.get("batch_size")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise WemoeError(f"'eval.batch_size' must be an integer >= 1, got {batch!r}", path=path)
    opts = dict(opts)
    if not opts.get("model"):
        model = ev.get("model", cfg.get("out"))
        opts["model"] = relative_to(here, model) if model else None
    if batch and opts.get("batch_size") is None:
        opts["batch_size"] = batch
    if not opts.get("tasks"):
        opts["tasks"] = tuple(f"{n}={s.get('head', '')}:{s['data']}" for n, s in specs.items() if s.get("data"))
    return opts


__all__ = ["MergeConfig", "TaskSpec", "merge_config", "load_yaml", "split_named", "named_paths", "check_unique", "eval_options_from_yaml"]
