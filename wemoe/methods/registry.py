"""The method registry: a merge method is one class with a typed parameter object.

A method declares its name, a frozen dataclass of parameters (defaults, ranges,
help, in the field metadata written by :func:`param`) and how it runs. Everything
user-facing is generated from these declarations: the CLI's ``--method`` choices
and flags, the YAML keys, the dry-run plan and config.json's ``parameters``.
Whether an option applies to a method is decided here and nowhere else.

Adding a method is one module::

    @register
    class Scaled(MergeMethod):
        name = "scaled"
        summary = "theta_0 + alpha * mean of the task vectors"

        @dataclass(frozen=True)
        class Params:
            alpha: float = param(0.5, "scale of the mean task vector", low=0.0)

        def run(self, job, directory): ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, get_type_hints

from wemoe.errors import UsageError, WemoeError

if TYPE_CHECKING:
    from wemoe.merging.job import MergeJob

_META = "wemoe"


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as the CLI, YAML and config.json see it."""

    field: str  # attribute of the Params dataclass
    key: str  # YAML key and config.json name ("lambda" for the field ``lam``)
    type: type  # float, int, bool or str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low is excluded (> rather than >=)
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], None] | None = None  # raises WemoeError for a bad value (structured strings)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` (from a flag, YAML or a keyword argument) as this parameter's type, range-checked."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            raise WemoeError(f"{where} must be true or false, got {value!r}")
        if self.type in (int, float):
            if isinstance(value, bool):
                raise WemoeError(f"{where} must be a number, got {value!r}")
            try:
                # YAML reads 1e-4 (no dot) as a string; an int parameter refuses 2.5 but takes 2.0
                number = float(value) if self.type is float else _as_int(value)
            except (TypeError, ValueError):
                kind = "a number" if self.type is float else "an integer"
                raise WemoeError(f"{where} must be {kind}, got {value!r}") from None
            if not math.isfinite(number):
                raise WemoeError(f"{where} must be a finite number, got {value}")
            self._check_range(number, where)
            return number
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            value = ",".join(str(v) for v in value)  # YAML [0, 3, 5] means 0,3,5
        if isinstance(value, (dict, list, tuple, bool)) or value is None:
            raise WemoeError(f"{where} must be a single value, got {value!r}")
        value = str(value)
        if self.choices is not None and value not in self.choices:
            raise WemoeError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}")
        if self.check is not None:
            self.check(value)
        return value

    def _check_range(self, number: float, where: str) -> None:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            raise WemoeError(f"{where} must be {'>' if self.low_open else '>='} {self.low:g}, got {number:g}")
        if self.high is not None and number > self.high:
            raise WemoeError(f"{where} must be <= {self.high:g}, got {number:g}")

    def describe_range(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='}{self.low:g}")
        if self.high is not None:
            parts.append(f"<={self.high:g}")
        return ", ".join(parts)


def _as_int(value: Any) -> int:
    number = float(value) if not isinstance(value, int) else value
    if number != int(number):
        raise ValueError(value)
    return int(number)


def param(
    default: Any,
    help: str,
    *,
    key: str | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: Iterable[str] | None = None,
    check: Callable[[Any], None] | None = None,
) -> Any:
    """A dataclass field that carries what the CLI and YAML need to know about it."""
    meta = {
        "help": help,
        "key": key,
        "low": low,
        "high": high,
        "low_open": low_open,
        "choices": tuple(choices) if choices is not None else None,
        "check": check,
    }
    return dataclasses.field(default=default, metadata={_META: meta})


def param_infos(params_cls: type) -> tuple[ParamInfo, ...]:
    hints = get_type_hints(params_cls)
    infos = []
    for f in dataclasses.fields(params_cls):
        meta = f.metadata.get(_META)
        if meta is None:
            raise TypeError(f"{params_cls.__qualname__}.{f.name} must be declared with wemoe.methods.param()")
        kind = hints[f.name]
        if kind not in (bool, int, float, str):
            raise TypeError(f"{params_cls.__qualname__}.{f.name}: parameters are bool, int, float or str, not {kind}")
        infos.append(
            ParamInfo(
                field=f.name,
                key=meta["key"] or f.name,
                type=kind,
                default=f.default,
                help=meta["help"],
                low=meta["low"],
                high=meta["high"],
                low_open=meta["low_open"],
                choices=meta["choices"],
                check=meta["check"],
            )
        )
    return tuple(infos)


class MergeMethod:
    """Base class of every merge method; subclasses are registered with :func:`register`.

    ``adapts``: the method trains coefficients on unlabeled task data, so it takes
    ``--data`` (and needs a head for every task it adapts on).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type]
    adapts: ClassVar[bool] = False

    @classmethod
    def params(cls) -> tuple[ParamInfo, ...]:
        return param_infos(cls.Params)

    def prepare(self, job: MergeJob) -> None:
        """Method-specific validation and loading, before any compute (and before a dry run's plan)."""

    def plan(self, job: MergeJob) -> list[str]:
        """Lines the dry run prints below the common plan."""
        return []

    def run(self, job: MergeJob, directory: Path) -> None:
        """Compute the merge and write every output file into ``directory`` (a temporary one)."""
        raise NotImplementedError


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make ``cls`` available to the CLI, YAML configs and ``wemoe.merge``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a name")
    if not dataclasses.is_dataclass(getattr(cls, "Params", None)):
        raise TypeError(f"{cls.__qualname__}.Params must be a dataclass")
    infos = cls.params()
    for info in infos:  # one key means one thing across methods: same type everywhere
        for other in REGISTRY.values():
            if other.name == name:
                continue
            for o in other.params():
                if o.key == info.key and o.type is not info.type:
                    raise TypeError(f"parameter '{info.key}' of {name} is {info.type.__name__}, but {o.type.__name__} in {other.name}")
    REGISTRY[name] = cls
    return cls


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method(name: str) -> type[MergeMethod]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}' (known: {', '.join(REGISTRY)})") from None


def all_params() -> dict[str, list[tuple[str, ParamInfo]]]:
    """Every parameter key of every registered method, with the methods declaring it."""
    out: dict[str, list[tuple[str, ParamInfo]]] = {}
    for name, cls in REGISTRY.items():
        for info in cls.params():
            out.setdefault(info.key, []).append((name, info))
    return out


def build_params(method: str, given: dict[str, Any], origin: Callable[[str], str] | None = None) -> Any:
    """The method's Params from ``given`` (parameter keys; unset ones take the defaults).

    The one place that decides whether an option applies to a method: a key that
    another method declares is refused naming the methods it belongs to.
    """
    cls = get_method(method)
    infos = {i.key: i for i in cls.params()}
    by_field = {i.field: i for i in infos.values()}
    known = all_params()
    values: dict[str, Any] = {}
    for key, value in given.items():
        info = infos.get(key) or by_field.get(key)
        where = origin(key) if origin else ParamInfo(key, key, str, None, "").flag
        if info is None:
            if key in known:
                owners = ", ".join(m for m, _ in known[key])
                raise UsageError(f"{where} only applies to --method {owners}")
            raise UsageError(f"unknown parameter '{key}' for method {method}")
        values[info.field] = info.coerce(value, where)
    return cls.Params(**values)


def params_record(params: Any) -> dict[str, Any]:
    """config.json's ``parameters``: every parameter of the method under its key."""
    return {info.key: getattr(params, info.field) for info in param_infos(type(params))}


__all__ = [
    "MergeMethod",
    "ParamInfo",
    "REGISTRY",
    "all_params",
    "build_params",
    "get_method",
    "method_names",
    "param",
    "param_infos",
    "params_record",
    "register",
]
