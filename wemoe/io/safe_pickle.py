"""Read pickled torch checkpoints (whole ``nn.Module`` objects) without running them.

The task_vectors / AdaMerging releases ship ``zeroshot.pt``, ``<Task>/finetuned.pt``
(a pickled ``src.modeling.ImageEncoder`` wrapping an open_clip ``CLIP``) and
``head_<Task>.pt`` (a pickled ``ClassificationHead``, an ``nn.Linear`` subclass with
a ``normalize`` flag). ``torch.load(weights_only=True)`` refuses them because they
name classes outside torch's allow-list, and ``weights_only=False`` would let the
file import and call anything (``os.system``, ``builtins.exec``, ...).

:func:`load_pickled_checkpoint` gets the tensors out anyway:

1. It first tries ``torch.load(path, map_location="cpu", weights_only=True)``; a
   plain state dict (possibly under a ``"state_dict"`` key) is used as is.
2. Otherwise it runs ``torch.load(..., weights_only=False, pickle_module=M)`` where
   ``M`` is a module object built here whose ``Unpickler`` decides every global.
   torch still parses the archive and reads the storages; torch's own
   ``UnpicklerWrapper`` subclasses ``M.Unpickler`` and defers to its
   ``find_class`` (it only short-cuts names containing ``"Storage"`` to
   ``torch.serialization.StorageType``, an inert dtype holder).
3. The resulting tree of inert objects is walked through the ``_parameters``,
   ``_buffers`` and ``_modules`` dictionaries that ``nn.Module`` pickles in its
   ``__dict__``, giving the same dotted keys as ``module.state_dict()``.

How the unpickler decides, and why it is safe: :mod:`wemoe.io.restricted_unpickler`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from wemoe.errors import WemoeError
from wemoe.io.restricted_unpickler import InertObject, describe_failure, restricted_pickle_module, sniff, torch_load

_MAX_DEPTH = 200  # nesting of modules/dicts walked when collecting tensors
_MAX_PLAIN_ITEMS = 64  # longest tuple/list kept as a plain attribute


@dataclass(frozen=True)
class PickledCheckpoint:
    """Tensors and plain settings recovered from a torch checkpoint file.

    ``state_dict`` uses the dotted keys ``module.state_dict()`` would give
    (``model.visual.conv1.weight``); non-persistent buffers and ``None`` entries
    are left out, every tensor is a detached CPU ``torch.Tensor``.
    ``attributes`` holds plain public values (``bool``, ``int``, ``float``,
    ``str``, ``None`` and short tuples/lists of them) found on the pickled
    modules (``training`` excepted), keyed by dotted path: ``"normalize"`` for a classification head,
    ``"model.visual.output_dim"``, ...; for a dict checkpoint, its plain
    top-level entries (``"epoch"``).
    """

    path: str
    state_dict: dict[str, torch.Tensor]
    attributes: dict[str, object] = field(default_factory=dict)
    #: ``"weights_only"``: torch's own safe loader sufficed; ``"restricted"``: the unpickler here.
    method: Literal["weights_only", "restricted"] = "weights_only"
    #: Class of the top-level object when it was a pickled object (``"src.modeling.ImageEncoder"``).
    root_type: str | None = None
    #: Every global the file named that was replaced by an inert stand-in, sorted.
    inert_globals: tuple[str, ...] = ()
    #: Dotted names of parameters/buffers that were present but not plain tensors.
    skipped: tuple[str, ...] = ()


def load_pickled_checkpoint(path: str | os.PathLike[str]) -> PickledCheckpoint:
    """Recover the tensors of a ``torch.save`` file without executing its pickle.

    Accepts bare state dicts, ``{"state_dict": ...}`` dicts and whole pickled
    modules, in the zip format (torch >= 1.6) or the legacy non-zip format.
    Raises :class:`~wemoe.errors.WemoeError` naming ``path`` for anything else:
    missing/empty/unrecognised files, corrupted or truncated archives,
    TorchScript archives, the old tar format, and files with no tensors.
    """
    p = Path(path)
    kind = sniff(p)

    try:
        obj = torch_load(p, kind, weights_only=True)
    except Exception:
        pass
    else:
        return _build_result(p, obj, "weights_only", ())

    recorder: set[str] = set()
    try:
        obj = torch_load(p, kind, weights_only=False, pickle_module=restricted_pickle_module(recorder))
    except WemoeError:
        raise
    except Exception as exc:
        raise WemoeError(describe_failure(exc), path=p) from None
    return _build_result(p, obj, "restricted", tuple(sorted(recorder)))


# --------------------------------------------------------------------------- collecting tensors


def _is_plain(value: object, depth: int = 0) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) in (tuple, list) and depth < 3 and len(value) <= _MAX_PLAIN_ITEMS:  # type: ignore[arg-type]
        return all(_is_plain(v, depth + 1) for v in value)  # type: ignore[union-attr]
    return False


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _mapping_items(value: object) -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str):
                yield k, v


class _Collector:
    """Walks modules (inert objects with ``_parameters``/``_buffers``/``_modules``) and dicts."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.attributes: dict[str, object] = {}
        self.skipped: list[str] = []
        self._active: set[int] = set()

    def visit(self, obj: object, prefix: str, depth: int) -> None:
        if depth > _MAX_DEPTH or id(obj) in self._active:
            self.skipped.append(prefix or "<root>")
            return
        self._active.add(id(obj))
        try:
            if isinstance(obj, InertObject):
                state = obj._inert_dict()
                if isinstance(state.get("_parameters"), dict) or isinstance(state.get("_modules"), dict):
                    self._module(state, prefix, depth)
            elif isinstance(obj, dict):
                self._mapping(obj, prefix, depth)
        finally:
            self._active.discard(id(obj))

    def _leaf(self, key: str, value: object) -> None:
        if value is None:
            return
        if isinstance(value, torch.Tensor):
            # The restricted path only ever builds plain tensors; torch's weights_only
            # loader may return nn.Parameter, kept as its plain data.
            tensor = value.detach()
            if type(tensor) is not torch.Tensor:
                tensor = tensor.as_subclass(torch.Tensor)
            self.tensors[key] = tensor
        else:
            self.skipped.append(key)

    def _module(self, state: dict[object, object], prefix: str, depth: int) -> None:
        non_persistent = state.get("_non_persistent_buffers_set")
        if not isinstance(non_persistent, (set, frozenset)):
            non_persistent = set()
        for name, value in _mapping_items(state.get("_parameters")):
            self._leaf(_join(prefix, name), value)
        for name, value in _mapping_items(state.get("_buffers")):
            if name not in non_persistent:
                self._leaf(_join(prefix, name), value)
        for name, value in state.items():
            if isinstance(name, str) and not name.startswith("_") and name != "training" and _is_plain(value):
                self.attributes[_join(prefix, name)] = value
        for name, child in _mapping_items(state.get("_modules")):
            if child is not None:
                self.visit(child, _join(prefix, name), depth + 1)

    def _mapping(self, mapping: dict[object, object], prefix: str, depth: int) -> None:
        for name, value in _mapping_items(mapping):
            key = _join(prefix, name)
            if isinstance(value, torch.Tensor):
                self._leaf(key, value)
            elif isinstance(value, (dict, InertObject)):
                self.visit(value, key, depth + 1)
            elif _is_plain(value):
                self.attributes[key] = value


def _build_result(path: Path, obj: object, method: Literal["weights_only", "restricted"], inert: tuple[str, ...]) -> PickledCheckpoint:
    collector = _Collector()
    root_type = type(obj).qualified_name if isinstance(obj, InertObject) else None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), (dict, InertObject)):
        for name, value in _mapping_items(obj):
            if name != "state_dict" and _is_plain(value):
                collector.attributes[name] = value
        collector.visit(obj["state_dict"], "", 0)
    else:
        collector.visit(obj, "", 0)
    if not collector.tensors:
        what = root_type or type(obj).__name__
        raise WemoeError(f"no tensors found (top-level object: {what})", path=path)
    return PickledCheckpoint(
        path=str(path),
        state_dict=collector.tensors,
        attributes=collector.attributes,
        method=method,
        root_type=root_type,
        inert_globals=inert,
        skipped=tuple(collector.skipped),
    )


__all__ = ["InertObject", "PickledCheckpoint", "load_pickled_checkpoint"]
