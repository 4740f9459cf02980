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
    # how each parameter was given, for error messages ("--lr" on the CLI, "'lr'" in YAML)
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


# ---------------------------------------------------------------- YAML
def load_yaml(path: str | Path) -> dict[str, Any]:
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
            raise WemoeError(f"task '{name}' has unknown field(s) {sorted(unknown)}", path=path)
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
        raise WemoeError(f"unknown config key(s): {', '.join(sorted(unknown))}", path=path)


# ---------------------------------------------------------------- named values
def named_paths(value: Mapping[str, Any] | Sequence[Any] | None, what: str) -> dict[str, str]:
    """Tasks, heads or data as ``{name: path}`` from a mapping, ``NAME=PATH`` strings or bare paths."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, (str, Path)):
        pairs = [split_named(str(value))]
    else:
        pairs = [split_named(str(v)) for v in value]
    check_unique([n for n, _ in pairs], f"{what} for task", [v for _, v in pairs])
    return dict(pairs)


def shared_heads(value: Mapping[str, Any] | Sequence[Any] | None, task_names: Sequence[str]) -> Mapping[str, Any] | Sequence[Any] | None:
    """``--heads clip:PATH`` without a name: a zero-shot head from that CLIP checkpoint for every task given no other head."""
    if value is None or isinstance(value, Mapping):
        return value
    values = [str(v) for v in ([value] if isinstance(value, (str, Path)) else value)]
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
        raise WemoeError(f"'method' must be a method name, got {method!r}", path=config)
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
    params = build_params(method, raw, origin=lambda k: origins.get(k, "--" + k.replace("_", "-")))

    dtype = pick("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise WemoeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    seed = pick("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise WemoeError(f"seed must be an integer, got {seed!r}")
    device = given.get("device") or "auto"
    if device not in DEVICES:
        raise WemoeError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
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
