"""Registries of kinds users pick by name: routers, expert stores, objectives.

A kind is one class: a ``name``, a one-line ``summary`` and a frozen ``Options``
dataclass declared with :func:`~wemoe.core.params.param`. An instance is the kind
with its options (``kind.options``), and is what the rest of the code passes
around: a router spec, an expert spec, an objective. A method selects a kind with
a :func:`~wemoe.core.params.component` parameter; the registry then provides the
flags of every kind's options, refuses an option given for another kind, and
rebuilds a kind from its record::

    ROUTERS = Registry("router", "--router")

    @ROUTERS.register
    class Scaled(RouterKind):
        name = "scaled"
        summary = "..."

        @dataclass(frozen=True)
        class Options:
            scale: float = param(1.0, "output scale", key="router_scale")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from wemoe.core.params import ParamInfo, option_infos
from wemoe.errors import UsageError, WemoeError


@dataclass(frozen=True)
class NoOptions:
    """The options of a kind that has none."""


class Kind:
    """A registered kind together with its options."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        if type(self.options) is not self.Options:
            raise TypeError(f"{type(self).__name__} takes {self.Options.__qualname__}, got {type(self.options).__name__}")

    @classmethod
    def option_infos(cls) -> tuple[ParamInfo, ...]:
        return option_infos(cls.Options)

    def record(self) -> dict[str, Any]:
        """The options as config.json stores them (field names, plain values)."""
        return dataclasses.asdict(self.options)

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> Kind:
        """Inverse of :meth:`record`; unknown fields are ignored, missing ones take their defaults."""
        names = {f.name for f in dataclasses.fields(cls.Options)}
        values = {k: v for k, v in (record or {}).items() if k in names and v is not None}
        try:
            return cls(cls.Options(**values))
        except TypeError as exc:
            raise WemoeError(f"{cls.name}: stored options do not fit ({exc})") from None

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options == self.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.options))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


K = TypeVar("K", bound=Kind)


class Registry(Generic[K]):
    """Kinds of one sort, by name, in registration order (the order help texts list them)."""

    def __init__(self, what: str, flag: str, base: type[K], auto: Callable[[Any], str] | None = None):
        self.what, self.flag, self.base = what, flag, base
        self._kinds: dict[str, type[K]] = {}
        self._auto = auto  # resolves the selector value "auto" from the other parameters
        self.version = 0  # bumped on every registration: generated parameter classes are rebuilt

    def register(self, cls: type[K]) -> type[K]:
        """Class decorator: make ``cls`` a choice of this registry's selector, with its options as flags."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or name == "auto":
            raise TypeError(f"{cls.__qualname__} needs a name (not 'auto')")
        if not issubclass(cls, self.base):
            raise TypeError(f"{cls.__qualname__} must subclass {self.base.__qualname__}")
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"{cls.__qualname__}.Options must be a dataclass")
        for info in cls.option_infos():  # one key means one thing across kinds: same type everywhere
            for other_name, other in self._kinds.items():
                if other_name == name:
                    continue
                for o in other.option_infos():
                    if o.key == info.key and o.type is not info.type:
                        raise TypeError(f"option '{info.key}' of {self.what} {name} is {info.type.__name__}, but {o.type.__name__} in {other_name}")
        self._kinds[name] = cls
        self.version += 1
        return cls

    def unregister(self, name: str) -> None:
        """Remove a kind (tests that register their own)."""
        if self._kinds.pop(name, None) is not None:
            self.version += 1

    def names(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def items(self) -> Iterator[tuple[str, type[K]]]:
        return iter(list(self._kinds.items()))

    def get(self, name: str) -> type[K]:
        try:
            return self._kinds[name]
        except KeyError:
            raise UsageError(f"unknown {self.what} '{name}' (known: {', '.join(self._kinds)})") from None

    def resolve(self, value: str, params: Any = None) -> str:
        """The kind a selector value names; ``auto`` is decided from the other parameters."""
        if value == "auto" and self._auto is not None:
            return self._auto(params)
        return value

    def flat_options(self, selector: str) -> list[ParamInfo]:
        """Every option any kind declares, once per key, with the kinds that declare it."""
        out: dict[str, ParamInfo] = {}
        owners: dict[str, list[str]] = {}
        for name, cls in self._kinds.items():
            for info in cls.option_infos():
                owners.setdefault(info.key, []).append(name)
                out.setdefault(info.key, info)
        return [dataclasses.replace(info, field=key, component=selector, kinds=tuple(owners[key])) for key, info in out.items()]

    def create(self, value: str, params: Any) -> K:
        """The selected kind with its options taken from a parameters object (``params.<key>``)."""
        cls = self.get(self.resolve(value, params))
        values = {info.field: getattr(params, info.key) for info in cls.option_infos() if hasattr(params, info.key)}
        return cls(cls.Options(**values))

    def from_record(self, name: str, options: Mapping[str, Any] | None) -> K:
        return self.get(name).from_record(options)  # type: ignore[return-value]


__all__ = ["Kind", "NoOptions", "Registry"]
