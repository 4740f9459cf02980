"""The restricted unpickler: rebuilds tensors and plain containers from a torch.save file and nothing else.

Used by :mod:`wemoe.io.safe_pickle`, which collects the tensors from what this returns. One module of
about 600 lines on purpose: the allow-list, the inert stand-ins and the re-implemented opcodes that
enforce them are one security argument, reviewed together.

What is trusted, and why this is safe
-------------------------------------
* Trusted: this module, the Python standard library's pure-Python unpickler
  (``pickle._Unpickler``) and torch's archive/storage reading code. Nothing in
  the file is trusted.
* ``find_class`` never imports and never looks anything up by attribute
  traversal. An exact ``(module, name)`` pair either appears in :data:`_ALLOWED`
  (plain containers, ``torch.Size``/``torch.device``/dtypes/memory formats,
  ``torch.UntypedStorage`` and *wrappers written here* around torch's tensor
  rebuild helpers that check their arguments) or resolves to a fresh subclass of
  :class:`InertObject`. Inert objects record the global's name, swallow any
  constructor arguments and keep ``__setstate__``/item/append state as data;
  they define no ``__call__``, ``__getattr__``, ``__reduce__`` or comparison
  hooks, so nothing from the file ever runs.
* The opcodes that make the unpickler call or mutate objects are re-implemented
  (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``INST``, ``OBJ``, ``BUILD``,
  ``APPEND(S)``, ``SETITEM(S)``, ``ADDITEMS``): calls are limited to allow-listed
  callables and inert classes, ``BUILD`` state is only accepted by inert objects
  (it is dropped for anything else, so a file cannot set attributes on torch
  classes or on the wrappers here), and items only go into plain
  lists/dicts/sets or inert objects.
* Persistent ids are limited to torch's ``("storage", ...)`` records; legacy
  ``("module", cls, source_file, source)`` records return ``cls`` without
  torch's source comparison, which could otherwise write a ``.patch`` file.
* The pre-2017 tar-based ``torch.save`` format and TorchScript archives (which
  ``torch.load`` would hand to ``torch.jit.load``) are refused up front.

Not covered: resource exhaustion (a file may declare huge storages or deeply
nested containers), and tensor subclasses, sparse, quantized or numpy-backed
tensors, which come back as inert objects and are listed in
:attr:`PickledCheckpoint.skipped`. Only state is recovered: module classes,
``forward`` code and preprocessing objects are not.
"""

from __future__ import annotations

import io
import pickle
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from wemoe.errors import WemoeError

# --------------------------------------------------------------------------- inert stand-ins


class InertObject:
    """Stand-in for a global the allow-list does not name.

    ``find_class`` answers such a global with a fresh subclass of this class
    whose ``qualified_name`` is ``"module.name"``. Calling the class (``REDUCE``)
    or ``__new__`` (``NEWOBJ``) only records the arguments; ``__setstate__``,
    item and append state are stored, never interpreted. Nothing here runs code
    that came from the file.
    """

    __slots__ = ("_inert_args", "_inert_kwargs", "_inert_state", "_inert_items", "_inert_list")
    qualified_name: ClassVar[str] = "?"

    def __new__(cls, *args: object, **kwargs: object) -> InertObject:
        self = object.__new__(cls)
        self._inert_args = args
        self._inert_kwargs = kwargs
        self._inert_state = None
        self._inert_items = {}
        self._inert_list = []
        return self

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        self._inert_state = state

    def __setitem__(self, key: object, value: object) -> None:
        self._inert_items[key] = value

    def append(self, value: object) -> None:
        self._inert_list.append(value)

    def extend(self, values: list[object]) -> None:
        self._inert_list.extend(values)

    def add(self, value: object) -> None:
        self._inert_list.append(value)

    def __repr__(self) -> str:
        return f"<inert {type(self).qualified_name}>"

    def _inert_dict(self) -> dict[object, object]:
        """The recorded ``__dict__``-like state (``(dict, slots)`` tuples merged)."""
        state = self._inert_state
        if isinstance(state, dict):
            return state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[object, object] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            return merged
        return {}


def _inert_class(qualified_name: str) -> type[InertObject]:
    namespace = {"__slots__": (), "qualified_name": qualified_name, "__module__": __name__}
    return type("InertGlobal", (InertObject,), namespace)


def _is_inert_class(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, InertObject)


# --------------------------------------------------------------------------- allow-list

_Unsafe = pickle.UnpicklingError


def _typed_storage(storage: object) -> torch.storage.TypedStorage:
    if not isinstance(storage, torch.storage.TypedStorage) or not isinstance(getattr(storage, "_untyped_storage", None), torch.UntypedStorage):
        raise _Unsafe(f"tensor rebuilt from a {type(storage).__name__}, not a torch storage")
    return storage


def _int(value: object, what: str) -> int:
    if type(value) is not int:
        raise _Unsafe(f"tensor {what} is not an int")
    return value


def _ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise _Unsafe(f"tensor {what} is not a tuple of ints")
    return tuple(value)


def _dtype(value: object) -> torch.dtype:
    if not isinstance(value, torch.dtype):
        raise _Unsafe("tensor dtype is not a torch.dtype")
    return value


def _tensor(value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _Unsafe(f"expected a tensor, got {type(value).__name__}")
    return value


def _view(storage: object, storage_offset: object, size: object, stride: object, dtype: torch.dtype | None) -> torch.Tensor:
    typed = _typed_storage(storage)
    untyped = typed._untyped_storage
    dtype = typed.dtype if dtype is None else dtype
    offset, shape, strides = _int(storage_offset, "offset"), _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides) or offset < 0 or any(v < 0 for v in shape + strides):
        raise _Unsafe("tensor with inconsistent size/stride")
    if all(shape):
        # set_ would silently grow the storage; a view past its end means a corrupt file.
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if (last + 1) * dtype.itemsize > untyped.nbytes():
            raise _Unsafe("tensor extends past the end of its storage")
    t = torch.empty((0,), dtype=dtype, device=untyped.device)
    return t.set_(untyped, offset, shape, strides)


def _apply_metadata(t: torch.Tensor, metadata: object) -> torch.Tensor:
    if metadata:
        if not isinstance(metadata, dict) or not all(type(k) is str and type(v) is bool for k, v in metadata.items()):
            raise _Unsafe("tensor metadata is not a dict of flags")
        torch._utils.set_tensor_metadata(t, metadata)
    return t


def _rebuild_tensor(storage: object, storage_offset: object, size: object, stride: object) -> torch.Tensor:
    """``torch._utils._rebuild_tensor`` with checked arguments."""
    return _view(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` minus autograd state (hooks are never attached)."""
    return _apply_metadata(_view(storage, storage_offset, size, stride, None), metadata)


def _rebuild_tensor_v3(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v3`` minus autograd state."""
    return _apply_metadata(_view(storage, storage_offset, size, stride, _dtype(dtype)), metadata)


def _rebuild_parameter(data: object, requires_grad: object = False, backward_hooks: object = None) -> torch.Tensor:
    """A parameter is kept as its plain data tensor; hooks are dropped."""
    return _tensor(data)


def _rebuild_parameter_with_state(data: object, requires_grad: object, backward_hooks: object, state: object) -> torch.Tensor:
    """As :func:`_rebuild_parameter`; Python attributes on the parameter are dropped."""
    return _tensor(data)


def _rebuild_device_tensor_from_cpu_tensor(data: object, dtype: object, device: object, requires_grad: object) -> torch.Tensor:
    """Kept on the CPU whatever device was recorded."""
    return _tensor(data).to(dtype=_dtype(dtype))


_TENSOR_REBUILDERS: tuple[Callable[..., torch.Tensor], ...] = (
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _rebuild_parameter_with_state,
    _rebuild_device_tensor_from_cpu_tensor,
)


def _rebuild_from_type_v2(func: object, new_type: object, args: object, state: object) -> torch.Tensor:
    """Tensor with Python attributes: rebuilt as a plain tensor, type and attributes dropped."""
    if not any(func is f for f in _TENSOR_REBUILDERS) or not isinstance(args, tuple):
        raise _Unsafe("tensor subclass rebuilt through a function outside the allow-list")
    return func(*args)


def _rebuild_from_type(func: object, new_type: object, args: object, state: object) -> torch.Tensor:
    return _rebuild_from_type_v2(func, new_type, args, state)


def _get_layout(name: object) -> torch.layout:
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise _Unsafe("unknown tensor layout")
    return layouts[name]


def _codecs_encode(obj: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """Protocol-2 pickles store ``bytes`` as ``_codecs.encode(text, "latin1")``."""
    if type(obj) is not str or encoding not in ("latin1", "latin-1"):
        raise _Unsafe("_codecs.encode is only allowed for latin1 text")
    return obj.encode("latin1")


_NEW_CLASSES: frozenset[type] = frozenset(
    {object, dict, OrderedDict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray, torch.Size}
)


def _newobj(cls: object, *args: object) -> object:
    if not (_is_inert_class(cls) or cls in _NEW_CLASSES):
        raise _Unsafe(f"refusing to create an instance from a {type(cls).__name__} object")
    return cls.__new__(cls, *args)  # type: ignore[union-attr]


def _newobj_ex(cls: object, args: object, kwargs: object) -> object:
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise _Unsafe("malformed __newobj_ex__ arguments")
    if not (_is_inert_class(cls) or cls in _NEW_CLASSES):
        raise _Unsafe(f"refusing to create an instance from a {type(cls).__name__} object")
    return cls.__new__(cls, *args, **kwargs)  # type: ignore[union-attr]


def _reconstructor(cls: object, base: object, state: object) -> object:
    """Protocol 0/1 object creation; only inert classes may be created this way."""
    if not _is_inert_class(cls):
        raise _Unsafe("copyreg._reconstructor is only allowed for inert classes")
    return cls(base, state)  # type: ignore[operator]


def _build_allowed() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
        ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): _rebuild_device_tensor_from_cpu_tensor,
        ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.serialization", "_get_layout"): _get_layout,
        ("copyreg", "__newobj__"): _newobj,
        ("copyreg", "__newobj_ex__"): _newobj_ex,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("_codecs", "encode"): _codecs_encode,
    }
    for cls in (dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray, object):
        allowed[("builtins", cls.__name__)] = cls
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


#: Exact ``(module, name)`` pairs a file may name; everything else becomes inert.
_ALLOWED: dict[tuple[str, str], object] = _build_allowed()
# torch.UntypedStorage is only compared against (persistent ids), never called.
_ALLOWED_CALLABLES: dict[int, object] = {id(v): v for v in _ALLOWED.values() if callable(v) and v is not torch.UntypedStorage}
# Python 2 module names that protocol 0-2 pickles may use.
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_STORAGE_TYPE = getattr(torch.serialization, "StorageType", None)


def _check_callable(func: object) -> None:
    if _is_inert_class(func):
        return
    if _ALLOWED_CALLABLES.get(id(func)) is func:
        return
    raise _Unsafe(f"refusing to call a {type(func).__name__} object")


# --------------------------------------------------------------------------- the unpickler


def restricted_pickle_module(recorder: set[str]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose ``Unpickler`` trusts nothing.

    ``recorder`` collects the name of every global answered with an inert class.
    """

    class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
        """Pure-Python unpickler: globals from the allow-list or inert; no other calls."""

        dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

        def find_class(self, module: str, name: str) -> Any:
            key = (_MODULE_ALIASES.get(module, module), name)
            if type(module) is str and type(name) is str and key in _ALLOWED:
                return _ALLOWED[key]
            qualified = f"{module}.{name}"
            cache = self.__dict__.setdefault("_inert_cache", {})
            if qualified not in cache:
                cache[qualified] = _inert_class(qualified)
                recorder.add(qualified)
            return cache[qualified]

        def persistent_load(self, pid: object) -> Any:
            raise _Unsafe("persistent id outside a torch archive")

        def load(self) -> Any:
            inner = self.persistent_load

            def guarded(pid: object) -> Any:
                if isinstance(pid, tuple) and pid:
                    tag = pid[0].decode("ascii", "replace") if type(pid[0]) is bytes else pid[0]
                    tag = tag if type(tag) is str else ""
                    if tag == "storage" and len(pid) in (5, 6):
                        storage_type, key, _location, numel = pid[1:5]
                        if not (storage_type is torch.UntypedStorage or (_STORAGE_TYPE is not None and isinstance(storage_type, _STORAGE_TYPE))):
                            raise _Unsafe("storage record with an unknown storage type")
                        if type(numel) is not int or numel < 0 or not isinstance(key, (str, bytes, int)):
                            raise _Unsafe("malformed storage record")
                        return inner(pid)
                    if tag == "module" and len(pid) == 4:
                        # Legacy format: the class of a pickled module, with its source for a
                        # diff that torch may write to disk. The class is all we need.
                        return pid[1]
                    raise _Unsafe("unknown persistent id record")
                if isinstance(pid, (str, bytes)):
                    return inner(pid)
                raise _Unsafe("unknown persistent id record")

            self.persistent_load = guarded
            try:
                return super().load()
            finally:
                self.persistent_load = inner

        # ---- opcodes that call or mutate objects: re-implemented, restricted

        def _instantiate(self, klass: object, args: list[object]) -> None:
            _check_callable(klass)
            self.append(klass(*args))  # type: ignore[operator]

        def load_reduce(self) -> None:
            stack = self.stack
            args = stack.pop()
            func = stack[-1]
            _check_callable(func)
            if not isinstance(args, tuple):
                raise _Unsafe("REDUCE arguments are not a tuple")
            stack[-1] = func(*args)  # type: ignore[operator]

        def load_newobj(self) -> None:
            args = self.stack.pop()
            cls = self.stack.pop()
            if not isinstance(args, tuple):
                raise _Unsafe("NEWOBJ arguments are not a tuple")
            self.append(_newobj(cls, *args))

        def load_newobj_ex(self) -> None:
            kwargs = self.stack.pop()
            args = self.stack.pop()
            cls = self.stack.pop()
            self.append(_newobj_ex(cls, args, kwargs))

        def load_build(self) -> None:
            state = self.stack.pop()
            inst = self.stack[-1]
            if isinstance(inst, InertObject):
                InertObject.__setstate__(inst, state)
            # Anything else keeps no state from the file (e.g. a state dict's
            # ``_metadata``): setting attributes is how a pickle would reach
            # into torch classes or the functions of this module.

        def load_append(self) -> None:
            value = self.stack.pop()
            self._extend(self.stack[-1], [value])

        def load_appends(self) -> None:
            items = self.pop_mark()
            self._extend(self.stack[-1], items)

        @staticmethod
        def _extend(target: object, items: list[object]) -> None:
            if type(target) is list:
                target.extend(items)
            elif isinstance(target, InertObject):
                InertObject.extend(target, items)
            else:
                raise _Unsafe(f"APPEND to a {type(target).__name__}")

        def load_setitem(self) -> None:
            stack = self.stack
            value = stack.pop()
            key = stack.pop()
            self._store(stack[-1], [key, value])

        def load_setitems(self) -> None:
            items = self.pop_mark()
            self._store(self.stack[-1], items)

        @staticmethod
        def _store(target: object, items: list[object]) -> None:
            if type(target) in (dict, OrderedDict):
                for i in range(0, len(items) - 1, 2):
                    target[items[i]] = items[i + 1]  # type: ignore[index]
            elif isinstance(target, InertObject):
                for i in range(0, len(items) - 1, 2):
                    InertObject.__setitem__(target, items[i], items[i + 1])
            else:
                raise _Unsafe(f"SETITEM on a {type(target).__name__}")

        def load_additems(self) -> None:
            items = self.pop_mark()
            target = self.stack[-1]
            if type(target) is set:
                target.update(items)
            elif isinstance(target, InertObject):
                InertObject.extend(target, items)
            else:
                raise _Unsafe(f"ADDITEMS on a {type(target).__name__}")

        for _opcode, _handler in (
            (pickle.REDUCE, load_reduce),
            (pickle.NEWOBJ, load_newobj),
            (pickle.NEWOBJ_EX, load_newobj_ex),
            (pickle.BUILD, load_build),
            (pickle.APPEND, load_append),
            (pickle.APPENDS, load_appends),
            (pickle.SETITEM, load_setitem),
            (pickle.SETITEMS, load_setitems),
            (pickle.ADDITEMS, load_additems),
        ):
            dispatch[_opcode[0]] = _handler
        del _opcode, _handler
        # INST and OBJ go through _instantiate (overridden above).

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()

    module = types.ModuleType("wemoe_restricted_pickle", "pickle stand-in whose Unpickler imports and calls nothing")
    module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.loads = loads  # type: ignore[attr-defined]
    return module


# --------------------------------------------------------------------------- files


class _NoFilenoReader(io.RawIOBase):
    """A file torch must read through ``read()``.

    Without a ``fileno`` torch skips its attempt to open a legacy file as the
    pre-2017 tar format (which extracts archive members to disk).
    """

    def __init__(self, raw: io.BufferedReader):
        super().__init__()
        self._raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._raw.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self._raw.read(size)

    def readline(self, size: int = -1) -> bytes:
        return self._raw.readline(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


def sniff(path: Path) -> Literal["zip", "legacy"]:
    """Classify the file by its first bytes; refuse what torch.load must not see."""
    try:
        if not path.is_file():
            raise WemoeError("no such file" if not path.exists() else "not a regular file", path=path)
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise WemoeError(f"cannot read file ({exc.strerror or exc})", path=path) from None
    if not head:
        raise WemoeError("empty file, not a torch checkpoint", path=path)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
            raise WemoeError("corrupted or truncated torch zip archive", path=path) from None
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
            raise WemoeError("TorchScript archive (torch.jit.save), not a torch.save checkpoint; refusing to load it", path=path)
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise WemoeError("zip archive without data.pkl, not a torch.save checkpoint", path=path)
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise WemoeError("tar-based torch.save checkpoint (PyTorch before 0.4) is not supported; re-save it with a current PyTorch", path=path)
    if head[0] == pickle.PROTO[0]:
        return "legacy"
    raise WemoeError("not a torch checkpoint (unrecognised file header)", path=path)


def torch_load(path: Path, kind: str, **kwargs: Any) -> object:
    if kind == "zip":
        return torch.load(path, map_location="cpu", mmap=False, **kwargs)
    with open(path, "rb") as raw:
        return torch.load(_NoFilenoReader(raw), map_location="cpu", mmap=False, **kwargs)


def describe_failure(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if isinstance(exc, EOFError) or any(s in lowered for s in ("truncated", "ran out of input", "unexpected eof")):
        return "truncated torch checkpoint (data ends early)"
    if "invalid magic number" in lowered:
        return "not a torch.save checkpoint (plain pickle or unknown format)"
    if isinstance(exc, pickle.UnpicklingError):
        return f"unreadable or refused pickle data ({text[:160]})"
    if "zip archive" in lowered or "central directory" in lowered:
        return f"corrupted torch zip archive ({text[:160]})"
    return f"corrupted or unsupported torch checkpoint ({type(exc).__name__}: {text[:160]})"


__all__ = ["InertObject", "describe_failure", "restricted_pickle_module", "sniff", "torch_load"]
