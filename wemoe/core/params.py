"""Typed parameters that generate their own CLI flags, YAML keys, help text and record.

A parameter is a field of a frozen dataclass declared with :func:`param` (default,
help, range, choices). A field declared with :func:`component` selects a kind from a
:class:`~wemoe.core.registry.Registry` (a router, an expert store, an objective), and
every option any registered kind declares becomes a parameter too, right after it.
Methods (``wemoe.methods``) and kinds (routers, expert stores, objectives) are
declared this way; ``wemoe merge``'s flags, YAML keys and config.json's
``parameters`` are all generated from these declarations.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, get_type_hints

from wemoe.errors import UsageError, WemoeError


class KindRegistry(Protocol):
    """What a component parameter needs of its registry (``wemoe.core.registry.Registry``)."""

    version: int

    def names(self) -> tuple[str, ...]: ...
    def flat_options(self, selector: str) -> list[ParamInfo]: ...
    def resolve(self, value: str, params: Any = None) -> str: ...


_META = "wemoe"
SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as the CLI, YAML and config.json see it."""

    field: str  # attribute of the dataclass that declares it (a kind's Options field for kind options)
    key: str  # YAML key, config.json name and (with dashes) the flag: "lambda" for the field ``lam``
    type: type  # float, int, bool or str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low is excluded (> rather than >=)
    fixed_choices: tuple[str, ...] | None = None
    check: Callable[[Any], None] | None = None  # raises WemoeError for a bad value (structured strings)
    registry: KindRegistry | None = None  # set for a component selector: its choices are the registry's kinds
    extra_choices: tuple[str, ...] = ()  # selector values that are not kinds ("auto")
    component: str | None = None  # set for a kind's option: the key of the selector it belongs to
    kinds: tuple[str, ...] = ()  # for a kind's option: the kinds that declare it

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...] | None:
        if self.registry is not None:
            return (*self.extra_choices, *self.registry.names())
        return self.fixed_choices

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` (from a flag, YAML or a keyword argument) as this parameter's type, range-checked."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            raise WemoeError(f"{where} must be true or false, got {_short(value)}")
        if self.type in (int, float):
            if isinstance(value, bool):
                raise WemoeError(f"{where} must be a number, got {_short(value)}")
            try:
                # YAML reads 1e-4 (no dot) as a string; an int parameter refuses 2.5 but takes 2.0
                number = float(value) if self.type is float else _as_int(value)
            except (TypeError, ValueError, OverflowError):
                kind = "a number" if self.type is float else "an integer"
                raise WemoeError(f"{where} must be {kind}, got {_short(value)}") from None
            if not math.isfinite(number):
                raise WemoeError(f"{where} must be a finite number, got {_short(value)}")
            self._check_range(number, where)
            return number
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            value = ",".join(str(v) for v in value)  # YAML [0, 3, 5] means 0,3,5
        if isinstance(value, (dict, list, tuple, bool)) or value is None:
            raise WemoeError(f"{where} must be a single value, got {_short(value)}")
        value = str(value)
        choices = self.choices
        if choices is not None and value not in choices:
            raise UsageError(f"{where} must be one of {', '.join(choices)}, got {_short(value)}")
        if self.check is not None:
            self.check(value)
        return value

    def _check_range(self, number: float, where: str) -> None:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            raise WemoeError(f"{where} must be {'>' if self.low_open else '>='} {self.low:g}, got {_number(number)}")
        if self.high is not None and number > self.high:
            raise WemoeError(f"{where} must be <= {self.high:g}, got {_number(number)}")

    def describe_range(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='}{self.low:g}")
        if self.high is not None:
            parts.append(f"<={self.high:g}")
        return ", ".join(parts)


_BOUNDED = reprlib.Repr()
_BOUNDED.maxlevel, _BOUNDED.maxstring, _BOUNDED.maxother, _BOUNDED.maxlong = 3, 60, 60, 40


def _short(value: Any, limit: int = 60) -> str:
    """A value as messages show it: a bounded repr, cut to ``limit`` characters (a hostile value may be huge,
    or a YAML alias bomb that a full repr would expand to gigabytes)."""
    try:
        text = _BOUNDED.repr(value)
    except (ValueError, RecursionError):  # an integer past Python's digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(number: float) -> str:
    try:
        return f"{number:g}"
    except OverflowError:  # an integer too large for a float
        return _short(number)


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


def component(registry: KindRegistry, default: str, help: str, *, key: str | None = None, extra_choices: Iterable[str] = ()) -> Any:
    """A field that picks a kind from ``registry``; every registered kind's options become parameters after it."""
    field = param(default, help, key=key)
    field.metadata[_META].update(registry=registry, extra_choices=tuple(extra_choices))
    return field


def _declared(params_cls: type) -> list[tuple[ParamInfo, dict[str, Any]]]:
    hints = get_type_hints(params_cls)
    out = []
    for f in dataclasses.fields(params_cls):
        meta = f.metadata.get(_META)
        if meta is None:
            raise TypeError(f"{params_cls.__qualname__}.{f.name} must be declared with wemoe.core.params.param()")
        kind = hints[f.name]
        if kind not in SCALARS:
            raise TypeError(f"{params_cls.__qualname__}.{f.name}: parameters are bool, int, float or str, not {kind}")
        info = ParamInfo(
            field=f.name,
            key=meta["key"] or f.name,
            type=kind,
            default=f.default,
            help=meta["help"],
            low=meta["low"],
            high=meta["high"],
            low_open=meta["low_open"],
            fixed_choices=meta["choices"],
            check=meta["check"],
            registry=meta.get("registry"),
            extra_choices=meta.get("extra_choices", ()),
        )
        out.append((info, meta))
    return out


def option_infos(options_cls: type) -> tuple[ParamInfo, ...]:
    """The parameters a kind's ``Options`` dataclass declares (no components there)."""
    infos = tuple(info for info, _ in _declared(options_cls))
    for info in infos:
        if info.registry is not None:
            raise TypeError(f"{options_cls.__qualname__}.{info.field}: a kind's options cannot select other kinds")
    return infos


def param_infos(params_cls: type) -> tuple[ParamInfo, ...]:
    """Every parameter of ``params_cls``: its own fields, each component selector followed by its kinds' options."""
    out: list[ParamInfo] = []
    for info, _ in _declared(params_cls):
        out.append(info)
        if info.registry is not None:
            out.extend(info.registry.flat_options(info.key))
    return tuple(out)


_FLAT_CACHE: dict[tuple, type] = {}


def params_class(params_cls: type) -> type:
    """The dataclass whose instances hold every parameter of ``params_cls``, component options included.

    Without components it is ``params_cls`` itself. With them it is built from the
    registries as they are now (a kind registered later adds its options), its field
    names being the parameters' keys for kind options.
    """
    declared = _declared(params_cls)
    registries = [info.registry for info, _ in declared if info.registry is not None]
    if not registries:
        return params_cls
    cache_key = (params_cls, *(r.version for r in registries))
    cached = _FLAT_CACHE.get(cache_key)
    if cached is not None:
        return cached
    fields: list[tuple[str, type, Any]] = []
    for f, (info, meta) in zip(dataclasses.fields(params_cls), declared):
        fields.append((f.name, info.type, dataclasses.field(default=f.default, metadata={_META: meta})))
        if info.registry is not None:
            for option in info.registry.flat_options(info.key):
                fields.append((option.key, option.type, dataclasses.field(default=option.default, metadata={_META: {"flat": option}})))
    flat = dataclasses.make_dataclass(params_cls.__name__, fields, frozen=True)
    flat.__qualname__ = params_cls.__qualname__
    _FLAT_CACHE[cache_key] = flat
    return flat


def build_values(infos: Iterable[ParamInfo], given: Mapping[str, Any], where: Callable[[str], str], unknown: Callable[[str], None]) -> dict[str, Any]:
    """``{attribute: coerced value}`` for the parameters in ``given`` (by key or field); ``unknown(key)`` raises for the rest."""
    infos = list(infos)
    by_key = {i.key: i for i in infos}
    by_field = {i.field: i for i in infos if i.component is None}
    values: dict[str, Any] = {}
    for key, value in given.items():
        info = by_key.get(key) or by_field.get(key)
        if info is None:
            unknown(key)
            continue
        attribute = info.key if info.component is not None else info.field
        values[attribute] = info.coerce(value, where(info.key))
    return values


def check_component_options(infos: Iterable[ParamInfo], params: Any, given_keys: Iterable[str], where: Callable[[str], str]) -> None:
    """Refuse an option given for a kind other than the one selected: ``--gate-rank`` with ``--router mlp``."""
    infos = list(infos)
    selectors = {i.key: i for i in infos if i.registry is not None}
    options = {i.key: i for i in infos if i.component is not None}
    for key in given_keys:
        info = options.get(key)
        if info is None:
            continue
        selector = selectors[info.component]
        chosen = selector.registry.resolve(getattr(params, selector.field), params)
        if chosen not in info.kinds:
            raise UsageError(f"{where(key)} only applies to {selector.flag} {', '.join(info.kinds)} (not {chosen})")


def record_of(params: Any) -> dict[str, Any]:
    """config.json's ``parameters``: every parameter under its key, in declaration order."""
    out = {}
    for f in dataclasses.fields(params):
        meta = f.metadata.get(_META) or {}
        flat = meta.get("flat")
        out[flat.key if flat is not None else (meta.get("key") or f.name)] = getattr(params, f.name)
    return out


__all__ = [
    "ParamInfo",
    "build_values",
    "check_component_options",
    "component",
    "option_infos",
    "param",
    "param_infos",
    "params_class",
    "record_of",
]
