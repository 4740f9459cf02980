"""Open any supported checkpoint file or directory as a flat, lazy tensor source.

This is the only place a checkpoint's bytes are read. Supported:
- ``.safetensors`` files (memory-mapped) and sharded sets with an ``*.index.json``;
- torch files ``.pt/.pth/.bin``: ``weights_only=True`` first; whole pickled modules
  (task_vectors' ``zeroshot.pt``) through the restricted unpickler, never by
  executing the pickle;
- directories: Hugging Face model folders (``config.json`` + ``model.safetensors``,
  a sharded index or ``pytorch_model.bin``) and wemoe output folders.
Key schemes are not interpreted here (see ``wemoe.schemes``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from wemoe.core import json_text
from wemoe.errors import WemoeError
from wemoe.io.safetensors_io import SafetensorsFile

TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


class TensorSource(Protocol):
    path: Path
    metadata: dict[str, str]
    config: dict | None

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str) -> torch.Tensor: ...
    def files(self) -> list[Path]: ...


class ShardedSafetensors:
    """One or several safetensors files seen as one key space."""

    def __init__(self, path: Path, files: list[Path], config: dict | None = None):
        self.path = path
        self.config = config
        self._files = [SafetensorsFile(f) for f in files]
        self._owner: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for k in f.keys():
                if k in self._owner:
                    raise WemoeError(f"tensor appears in two shards ({self._owner[k].path.name}, {f.path.name})", path=path, tensor=k)
                self._owner[k] = f
        self.metadata = dict(self._files[0].metadata) if self._files else {}

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._owner[key].dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self._owner[key].get(key)

    def files(self) -> list[Path]:
        return [f.path for f in self._files]


class InMemorySource:
    """Tensors already in memory (torch state-dict files, recovered pickles)."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, config: dict | None = None):
        self.path = path
        self._tensors = tensors
        self.metadata = metadata or {}
        self.config = config

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def files(self) -> list[Path]:
        return [self.path]


def _flatten_tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and isinstance(v, (torch.Tensor, dict)):
                out.update(_flatten_tensors(v, f"{prefix}{k}."))
    return out


def _unwrap_state_dict(obj: object) -> object:
    """Training scripts often nest the weights under 'state_dict' or 'model'."""
    while isinstance(obj, dict):
        tensor_values = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if tensor_values:
            return obj
        for key in ("state_dict", "model_state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            return obj
    return obj


# Globals no checkpoint needs and every code-execution payload uses. The restricted
# unpickler never calls them (they come back inert), but a file naming them is
# hostile, so its tensors are not trusted either.
CODE_MODULES = {
    "os",
    "posix",
    "nt",
    "subprocess",
    "pty",
    "sys",
    "shutil",
    "socket",
    "runpy",
    "importlib",
    "code",
    "codeop",
    "ctypes",
    "webbrowser",
    "pickle",
    "marshal",
    "multiprocessing",
    "commands",
    "platform",
}
CODE_BUILTINS = {"exec", "eval", "compile", "__import__", "open", "breakpoint", "input", "globals", "locals", "vars"}


def _runs_code(qualified: str) -> bool:
    module, _, name = qualified.rpartition(".")
    top = module.split(".")[0]
    return top in CODE_MODULES or (module in ("builtins", "__builtin__") and name in CODE_BUILTINS)


def _open_torch_file(path: Path) -> InMemorySource:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as first_error:
        from wemoe.io.safe_pickle import load_pickled_checkpoint

        try:
            loaded = load_pickled_checkpoint(path)
        except WemoeError:
            raise
        except Exception as exc:
            raise WemoeError(f"cannot read torch file ({type(first_error).__name__}; {type(exc).__name__}: {exc})", path=path) from None
        dangerous = [g for g in getattr(loaded, "inert_globals", ()) if _runs_code(g)]
        if dangerous:
            raise WemoeError(f"refusing a pickle that calls {dangerous[0]} (it would run code if loaded by torch.load)", path=path) from None
        meta = {k: str(v) for k, v in getattr(loaded, "attributes", {}).items()}
        return InMemorySource(path, dict(loaded.state_dict), meta)
    tensors = _flatten_tensors(_unwrap_state_dict(obj))
    if not tensors:
        raise WemoeError("torch file holds no tensors", path=path)
    return InMemorySource(path, tensors)


def _read_json(path: Path) -> dict:
    try:
        data = json_text.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WemoeError(f"cannot read JSON ({exc})", path=path) from None
    if not isinstance(data, dict):
        raise WemoeError("expected a JSON object", path=path)
    return data


def _index_files(index: Path) -> list[Path]:
    data = _read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WemoeError("index has no weight_map", path=index)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise WemoeError("index weight_map must map tensor names to shard file names", path=index)
    names = sorted(set(weight_map.values()))
    for n in names:
        if n in ("", ".", "..") or "/" in n or "\\" in n or Path(n).name != n:
            raise WemoeError(f"index names a shard outside its directory '{n}'", path=index)
        if not (index.parent / n).is_file():
            raise WemoeError(f"index names a missing shard '{n}'", path=index)
    return [index.parent / n for n in names]


def open_source(path: str | Path) -> TensorSource:
    """Open a checkpoint file or folder; refuses anything it cannot read with one line."""
    p = Path(path)
    if not p.exists():
        raise WemoeError("no such file or directory", path=p)
    if p.is_dir():
        config_path = p / "config.json"
        config = _read_json(config_path) if config_path.is_file() else None
        if (p / "model.safetensors").is_file():
            return ShardedSafetensors(p, [p / "model.safetensors"], config)
        index = p / "model.safetensors.index.json"
        if index.is_file():
            return ShardedSafetensors(p, _index_files(index), config)
        if (p / "pytorch_model.bin").is_file():
            src = _open_torch_file(p / "pytorch_model.bin")
            src.path, src.config = p, config
            return src
        raise WemoeError("directory holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin", path=p)
    if p.name.endswith(".index.json"):
        return ShardedSafetensors(p, _index_files(p))
    if p.suffix == ".safetensors":
        return ShardedSafetensors(p, [p])
    if p.suffix in TORCH_SUFFIXES:
        return _open_torch_file(p)
    raise WemoeError("unknown checkpoint format (expected .safetensors, .pt/.pth/.bin, or a model directory)", path=p)
