"""Streaming safetensors reader and writer.

Why not ``safetensors.torch.load_file``/``save_file``: a merge must stay near the
size of one model in memory. The reader memory-maps the file and hands back one
tensor at a time, releasing the mapped pages afterwards (so nine mapped inputs
do not show up as nine models of resident memory); the writer emits the header
first and then each tensor as soon as it is computed, so the output never has to
be held whole. The header is validated strictly before any tensor is read: a
file that lies about sizes or offsets is refused, naming the file and tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from wemoe.core import json_text
from wemoe.errors import WemoeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
ALIGN = 8


def _json_int(value: object) -> int:
    """A header number: a JSON integer, not a float, string or bool that int() would accept."""
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """A memory-mapped safetensors file with a validated header."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise WemoeError(f"cannot open: {exc.strerror}", path=self.path) from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise WemoeError("not a safetensors file (shorter than its 8-byte header length)", path=self.path)
        (header_len,) = struct.unpack("<Q", self._fh.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise WemoeError("corrupted safetensors file: header length exceeds the file", path=self.path)
        try:
            header = json_text.loads(self._fh.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WemoeError("corrupted safetensors file: header is not valid JSON", path=self.path) from None
        if not isinstance(header, dict):
            raise WemoeError("corrupted safetensors file: header is not a JSON object", path=self.path)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise WemoeError("corrupted safetensors file: __metadata__ must map strings to strings", path=self.path)
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(_json_int(d) for d in info["shape"])
                start, end = (_json_int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WemoeError("corrupted safetensors header entry", path=self.path, tensor=key) from None
            numel = 1
            for d in shape:
                if d < 0:
                    raise WemoeError("negative dimension in header", path=self.path, tensor=key)
                numel *= d
            if end - start != numel * _element_size(dtype) or start < 0 or end > data_len:
                raise WemoeError(
                    f"header lies about the tensor's size: shape {list(shape)} {info['dtype']} needs "
                    f"{numel * _element_size(dtype)} bytes, offsets give {end - start} within {data_len} data bytes",
                    path=self.path,
                    tensor=key,
                )
            self._entries[key] = (dtype, shape, start, end)
            spans.append((start, end, key))
        spans.sort()
        for (_s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise WemoeError(f"header places tensors '{k0}' and '{k1}' over the same bytes", path=self.path)
        self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> torch.Tensor:
        """Copy one tensor out of the mapping, then drop the mapped pages."""
        dtype, shape, start, end = self._entries[key]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        offset = self._data_start + start
        buf = np.frombuffer(self._mmap, dtype=np.uint8, count=end - start, offset=offset)
        out = torch.from_numpy(buf.copy()).view(dtype).reshape(shape)
        del buf
        page = mmap.PAGESIZE
        lo = (offset // page) * page
        if hasattr(self._mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED, lo, offset + (end - start) - lo)
            except OSError:
                pass
        return out

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
        self._fh.close()


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    sizes = []
    for key, dtype, shape in entries:
        n = _element_size(dtype)
        for d in shape:
            n *= d
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes.append(n)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % ALIGN)
    return raw, sizes


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are produced one by one, in header order."""

    def __init__(self, path: str | Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._entries = list(entries)
        raw, self._sizes = _header_bytes(self._entries, metadata or {})
        self._fh: BinaryIO = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        name, dtype, shape = self._entries[self._next]
        if key != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"writer expected {name} {dtype} {shape}, got {key} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        self._fh.write(data.numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._entries):
            self._fh.close()
            raise RuntimeError(f"{self.path}: {len(self._entries) - self._next} tensors were never written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a small, already-computed dict of tensors (heads, routers, test fixtures)."""
    writer = SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    f = SafetensorsFile(path)
    try:
        return {k: f.get(k) for k in f.keys()}, dict(f.metadata)
    finally:
        f.close()
