"""Atomic output directories and (sharded) safetensors model files.

A merge writes into a hidden temporary directory beside the destination and
renames it into place only when every file is complete, so an interrupted run
never leaves something under the final name that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from wemoe.errors import UsageError, WemoeError
from wemoe.io.safetensors_io import SafetensorsWriter, _element_size

TMP_MARK = ".wemoe-tmp-"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    s = str(text)[:100].strip().upper().replace("IB", "B")
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                value = float(s[: -len(unit)])
            except ValueError:
                break
            if not 0 < value < 1e18:  # nan, inf and sizes no disk holds
                break
            return int(value * mult)
    try:
        value = int(s)
        if value > 0:
            return value
    except ValueError:
        pass
    raise UsageError(f"invalid size {str(text)[:40]!r} (examples: 2GB, 500MB)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dest: Path) -> None:
    """Remove temporary directories left by earlier runs that died (their pid is gone)."""
    parent = dest.parent
    if not parent.is_dir():
        return
    prefix = f".{dest.name}{TMP_MARK}"
    for entry in parent.iterdir():
        if entry.name.startswith(prefix) and entry.is_dir():
            try:
                pid = int(entry.name[len(prefix) :].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(entry, ignore_errors=True)


def input_paths(*values: str | Path | None) -> list[Path]:
    """The paths among ``values`` that name something on disk (a ``clip:`` head's prefix dropped)."""
    out = []
    for v in values:
        if v is None or v == "":
            continue
        text = str(v)
        if text.startswith("clip:") and not Path(text).exists():
            text = text[len("clip:") :]
        if Path(text).exists():
            out.append(Path(text))
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def overlap(dest: Path, source: Path) -> str | None:
    """How an output ``dest`` meets an input ``source``: 'is', 'contains' or 'is inside' it; None when apart."""
    d, s = dest.resolve(), source.resolve()
    if _same(d, s):
        return "is"
    if d in s.parents or any(_same(d, p) for p in s.parents if p.exists() and d.exists()):
        return "contains"
    if s in d.parents or any(_same(s, p) for p in d.parents if p.exists()):
        return "is inside"
    return None


def check_not_input(dest: str | Path, inputs: Iterable[str | Path], file: bool = False) -> None:
    """Refuse an output that is an input, contains one or lies inside one: --force must never destroy an input.

    A report file (``file=True``) may be written inside an input directory as long as it replaces nothing there.
    """
    dest = Path(dest)
    for source in inputs:
        how = overlap(dest, Path(source))
        if how is None or (file and how == "is inside" and not dest.exists()):
            continue
        raise WemoeError(f"output {how} the input {source} (an output never replaces or holds an input)", path=dest)


def check_destination(dest: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an unusable output path before any work is done (one that is, holds or lies inside an input too)."""
    if not isinstance(force, bool):
        raise WemoeError(f"force must be True or False, got {type(force).__name__} {str(force)[:40]!r}")
    dest = Path(dest)
    check_not_input(dest, inputs)
    if dest.exists() and not dest.is_dir():
        raise WemoeError("output path exists and is a file", path=dest)
    if dest.exists() and not force:
        raise WemoeError("output directory already exists (use --force to replace it)", path=dest)
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise WemoeError("parent directory does not exist", path=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WemoeError("parent directory is not writable", path=parent)
    return dest


class AtomicDirectory:
    """``with AtomicDirectory(dest, force) as tmp:`` write into tmp; renamed to dest on success."""

    def __init__(self, dest: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()):
        self.dest = check_destination(dest, force, inputs)
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        clean_stale(self.dest)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}{TMP_MARK}{os.getpid()}-", dir=self.dest.resolve().parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.strerror:  # disk full, quota, I/O error: the user's to fix
                raise WemoeError(f"cannot write the output ({exc.strerror}); nothing was written", path=self.dest) from exc
            return
        try:
            os.chmod(self.tmp, 0o755)
            if self.dest.exists():
                if not self.force:
                    raise WemoeError("output directory appeared while writing (use --force to replace it)", path=self.dest)
                trash = self.tmp.with_name(self.tmp.name + "-old")
                os.rename(self.dest, trash)
                os.rename(self.tmp, self.dest)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.tmp, self.dest)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


Entry = tuple[str, torch.dtype, tuple[int, ...]]


def _nbytes(entry: Entry) -> int:
    n = _element_size(entry[1])
    for d in entry[2]:
        n *= d
    return n


def plan_shards(entries: list[Entry], shard_size: int | None) -> list[list[Entry]]:
    if not shard_size:
        return [entries]
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + _nbytes(e) > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += _nbytes(e)
    return shards


def write_model(
    directory: Path,
    entries: list[Entry],
    produce: Callable[[], Iterable[tuple[str, torch.Tensor]]],
    metadata: Mapping[str, str],
    shard_size: int | None = None,
) -> list[str]:
    """Stream tensors from ``produce()`` (in ``entries`` order) into one or more files."""
    shards = plan_shards(entries, shard_size)
    names = [MODEL_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stream = iter(produce())
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        writer = SafetensorsWriter(directory / name, shard, metadata)
        for key, _, _ in shard:
            got_key, tensor = next(stream)
            writer.write(got_key, tensor)
            weight_map[key] = name
        writer.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(e) for e in entries)}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def config_metadata(config: Mapping) -> dict[str, str]:
    """The config as safetensors header metadata (string values only).

    ``format`` stays ``pt``: it says how the tensors were saved (transformers refuses
    any other value), so the record's own ``format`` is left to config.json / wemoe.json.
    """
    out = {"format": "pt"}
    for k, v in config.items():
        if k != "format":
            out[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out
