"""The method registry and the contract every merge method keeps.

A method declares its name, a frozen dataclass of parameters (defaults, ranges,
help, in the field metadata written by :func:`~wemoe.core.params.param`; a
:func:`~wemoe.core.params.component` field picks a router, expert store or
objective and brings that registry's options along) and three steps:

* ``prepare(ctx) -> state``: the method's own checks and loading, before any
  compute (and before a dry run's plan); returns its typed state;
* ``plan(ctx, state) -> lines`` for the dry run;
* ``run(ctx, state) -> MethodResult``: the merge, as a tensor-by-tensor function
  (``produces = "plain"``) or a module (``produces = "moe"``), with the method's
  record section and report. Methods never write: the job (``wemoe.merging.job``)
  writes the output, and only on the process that writes.

Everything user-facing is generated from these declarations: the CLI's
``--method`` choices and flags, the YAML keys, the dry-run plan and config.json's
``parameters``. Whether an option applies to a method is decided here and nowhere else.

Adding a method is one module::

    @register
    class Scaled(StaticMethod):
        name = "scaled"
        summary = "theta_0 + alpha * mean of the task vectors"

        @dataclass(frozen=True)
        class Params:
            alpha: float = param(0.5, "scale of the mean task vector", low=0.0)

        def tensor_merge(self, params): ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import click
import torch
from torch import nn

from wemoe.checkpoints.inputs import MergeInputs
from wemoe.core.params import ParamInfo, build_values, check_component_options, param_infos, params_class, record_of
from wemoe.core.tasks import TaskSpec
from wemoe.errors import UsageError
from wemoe.model.heads import Head

# (canonical key, base tensor, task vectors of that tensor) -> merged tensor
TensorMerge = Callable[[str, torch.Tensor, Iterable[torch.Tensor]], torch.Tensor]
OutputKind = Literal["plain", "moe"]


@dataclass
class MethodContext:
    """What a method is given: validated inputs and heads, the task specs, its parameters, where to compute."""

    inputs: MergeInputs
    tasks: list[TaskSpec]
    heads: dict[str, Head]
    params: Any
    device: str = "cpu"
    seed: int = 0
    quiet: bool = False

    @property
    def progress(self) -> bool:
        return not self.quiet

    def note(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        click.echo(f"wemoe: warning: {message}", err=True)  # shown even with --quiet


@dataclass
class MethodResult:
    """What a method produced; the job turns it into the output directory.

    ``merge`` (plain outputs): the merged tensor from a base tensor and its task vectors,
    streamed by the job over every tensor in the base's own key scheme. ``module``
    (mixture-of-experts outputs): the module whose state is written. ``section``: the
    method's record (config.json, under the method's name; a mixture's under ``wemoe``).
    """

    summary: str
    merge: TensorMerge | None = None
    module: nn.Module | None = None
    section: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)


class MergeMethod:
    """Base class of every merge method; subclasses are registered with :func:`register`.

    ``adapts``: the method trains coefficients on unlabeled task data, so it takes
    ``--data`` (and needs a head for every task it adapts on). ``produces``: a plain
    checkpoint in the base's key scheme, or a mixture-of-experts module (``wemoe.load``
    rebuilds it).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type]
    adapts: ClassVar[bool] = False
    produces: ClassVar[OutputKind] = "plain"

    @classmethod
    def params(cls) -> tuple[ParamInfo, ...]:
        return param_infos(cls.Params)

    def prepare(self, ctx: MethodContext) -> Any:
        """Method-specific validation and loading, before any compute; returns the method's state."""
        return None

    def plan(self, ctx: MethodContext, state: Any) -> list[str]:
        """Lines the dry run prints below the common plan."""
        return []

    def run(self, ctx: MethodContext, state: Any) -> MethodResult:
        raise NotImplementedError


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make ``cls`` available to the CLI, YAML configs and ``wemoe.merge``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a name")
    if not dataclasses.is_dataclass(getattr(cls, "Params", None)):
        raise TypeError(f"{cls.__qualname__}.Params must be a dataclass")
    if cls.produces not in ("plain", "moe"):
        raise TypeError(f"{cls.__qualname__}.produces must be 'plain' or 'moe'")
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
    """The method's parameters from ``given`` (parameter keys; unset ones take the defaults).

    The one place that decides whether an option applies to a method (a key another
    method declares is refused naming the methods it belongs to) and to the kind a
    component selects (``--gate-rank`` with ``--router mlp`` is refused naming the
    router kinds that take it).
    """
    cls = get_method(method)
    infos = cls.params()
    known = all_params()
    where = origin or (lambda key: "--" + key.replace("_", "-"))

    def unknown(key: str) -> None:
        if key in known:
            owners = ", ".join(m for m, _ in known[key])
            raise UsageError(f"{where(key)} only applies to --method {owners}")
        raise UsageError(f"unknown parameter '{key}' for method {method}")

    values = build_values(infos, given, where, unknown)
    params = params_class(cls.Params)(**values)
    by_field = {i.field: i.key for i in infos if i.component is None}
    check_component_options(infos, params, [by_field.get(k, k) for k in given], where)
    return params


def params_record(params: Any) -> dict[str, Any]:
    """config.json's ``parameters``: every parameter of the method under its key."""
    return record_of(params)


__all__ = [
    "REGISTRY",
    "MergeMethod",
    "MethodContext",
    "MethodResult",
    "OutputKind",
    "TensorMerge",
    "all_params",
    "build_params",
    "get_method",
    "method_names",
    "params_record",
    "register",
]
