"""Task data: image folders and .npz arrays, preprocessed as the model expects.

Preprocessing follows the architecture: resize to its image size, RGB, scale to
[0, 1], normalise with its mean/std (CLIP's for CLIP layouts). Labels are only
read for evaluation; router adaptation never looks at them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wemoe.core.arch import ViTArch
from wemoe.core.memory import memory_limit
from wemoe.errors import WemoeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class TaskData:
    """Images as uint8 arrays (N, H, W, 3) or lazily as file paths, plus labels."""

    source: str
    labels: np.ndarray
    arrays: np.ndarray | None = None
    files: list[Path] | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, limit: int | None) -> TaskData:
        if limit is None or limit >= len(self):
            return self
        return TaskData(
            self.source,
            self.labels[:limit],
            None if self.arrays is None else self.arrays[:limit],
            None if self.files is None else self.files[:limit],
            self.classes,
        )

    def raw(self, start: int, stop: int) -> np.ndarray | list[np.ndarray]:
        if self.arrays is not None:
            return self.arrays[start:stop]
        return _stack([_read_image(f) for f in self.files[start:stop]])  # type: ignore[index]

    def take(self, indices: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Raw uint8 images at ``indices`` (labels are not touched)."""
        if self.arrays is not None:
            return self.arrays[indices]
        return _stack([_read_image(self.files[i]) for i in indices])  # type: ignore[index]

    def batches(self, batch_size: int, arch: ViTArch, device: str = "cpu"):
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield preprocess(self.raw(start, stop), arch, device), torch.from_numpy(self.labels[start:stop]).long()


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise WemoeError(f"cannot read image ({type(exc).__name__})", path=path) from None


def _stack(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One array when the images share a size; a list otherwise (image folders mix sizes)."""
    if len({im.shape for im in images}) <= 1:
        return np.stack(images)
    return images


def _check_image(path: Path) -> None:
    """Refuse a file that is not a readable image before any compute: the chunks are verified
    (PNG checksums) and then the whole image is decoded, so truncated JPEGs, PNGs whose checksums
    hold over corrupt data and zero-sized images are caught here, not mid-adaptation."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            if im.width < 1 or im.height < 1:
                raise WemoeError(f"image is empty ({im.width}x{im.height})", path=path)
            im.convert("RGB")  # decodes every pixel, as the run will
    except WemoeError:
        raise
    except Exception as exc:
        raise WemoeError(f"cannot read image ({type(exc).__name__})", path=path) from None


def _to_rgb_uint8(x: np.ndarray, path: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise WemoeError(f"images must be uint8, got {x.dtype}", path=path)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise WemoeError(f"images must be (N,H,W) or (N,H,W,C) with C in 1/3/4, got {x.shape}", path=path)
    if 0 in x.shape[1:3]:
        raise WemoeError(f"images are empty (shape {x.shape})", path=path)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x[..., :3])


def preprocess(images: np.ndarray | list[np.ndarray], arch: ViTArch, device: str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, S, S) at the model's image size.

    A list of (H, W, 3) arrays of different sizes is resized image by image.
    """
    if isinstance(images, list):
        return torch.cat([preprocess(np.stack([im]), arch, device) for im in images])
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    size = arch.image_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    mean = torch.tensor(arch.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(arch.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _check_npz_member(z: np.lib.npyio.NpzFile, key: str, path: Path) -> None:
    """Read an array's header before its data: a few compressed bytes may claim (or inflate to) more than memory holds."""
    info = z.zip.getinfo(f"{key}.npy")
    with z.zip.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    limit = memory_limit()
    if max(claimed, info.file_size) > limit:
        raise WemoeError(f"array '{key}' claims {max(claimed, info.file_size) / 2**30:.3g} GiB; this machine can hold {limit / 2**30:.3g} GiB", path=path)
    if claimed > info.file_size:
        raise WemoeError(f"array '{key}' claims shape {shape} but holds only {info.file_size} bytes", path=path)


def _load_npz(path: Path, split: str) -> TaskData:
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if f"x_{split}" in files:
                keys = (f"x_{split}", f"y_{split}")
            elif "x" in files:
                keys = ("x", "y")
            else:
                raise WemoeError(f"no 'x_{split}' or 'x' array (found: {', '.join(sorted(files))[:300]})", path=path)
            for key in (*keys, "classes"):
                if key in files:
                    _check_npz_member(z, key, path)
            x, y = z[keys[0]], z.get(keys[1])
            classes = [str(c) for c in z["classes"]] if "classes" in files else None
    except WemoeError:
        raise
    except Exception as exc:
        raise WemoeError(f"cannot read .npz ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", path=path) from None
    x = _to_rgb_uint8(x, str(path))
    if y is None:
        y = np.full(len(x), -1, dtype=np.int64)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise WemoeError(f"labels must be {len(x)} integers, got shape {y.shape} {y.dtype}", path=path)
    if len(x) == 0:
        raise WemoeError("no images", path=path)
    return TaskData(str(path), y.astype(np.int64), arrays=x, classes=classes)


def _folder_root(path: Path, split: str) -> Path:
    return path / split if (path / split).is_dir() else path


def _class_dirs(root: Path) -> list[Path]:
    """The class sub-folders of an image folder; their sorted order is the label order."""
    try:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:
        raise WemoeError(f"cannot list directory ({exc.strerror})", path=root) from None
    if not class_dirs:
        raise WemoeError("no class sub-folders (expected one folder of images per class)", path=root)
    return class_dirs


def _load_folder(path: Path, split: str) -> TaskData:
    root = _folder_root(path, split)
    class_dirs = _class_dirs(root)
    files: list[Path] = []
    labels: list[int] = []
    for label, d in enumerate(class_dirs):
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            raise WemoeError(f"cannot list directory ({exc.strerror})", path=d) from None
        for f in entries:
            if f.name.startswith("."):
                continue
            if f.is_dir():
                continue
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise WemoeError("not an image file (remove it or move it out of the data folder)", path=f)
            _check_image(f)
            files.append(f)
            labels.append(label)
    if not files:
        raise WemoeError("no images in any class folder", path=root)
    return TaskData(str(root), np.asarray(labels, dtype=np.int64), files=files, classes=[d.name for d in class_dirs])


def read_classes(path: str | Path, split: str = "test") -> list[str] | None:
    """Class names of task data in label order, without reading its images: an image folder's
    class sub-folders, or an .npz's ``classes`` array (None when it has none)."""
    p = Path(path)
    if not p.exists():
        raise WemoeError("no such file or directory", path=p)
    if p.is_dir():
        return [d.name for d in _class_dirs(_folder_root(p, split))]
    if p.suffix != ".npz":
        raise WemoeError("data must be an image folder or an .npz file", path=p)
    try:
        with np.load(p, allow_pickle=False) as z:
            return [str(c) for c in z["classes"]] if "classes" in z.files else None
    except Exception as exc:
        raise WemoeError(f"cannot read .npz ({type(exc).__name__})", path=p) from None


def load_data(path: str | Path, split: str = "test") -> TaskData:
    p = Path(path)
    if not p.exists():
        raise WemoeError("no such file or directory", path=p)
    if p.is_dir():
        return _load_folder(p, split)
    if p.suffix == ".npz":
        return _load_npz(p, split)
    raise WemoeError("data must be an image folder or an .npz file", path=p)


def check_labels(data: TaskData, num_classes: int, task: str) -> None:
    if (data.labels < 0).any():
        raise WemoeError(f"task '{task}': data has no labels to evaluate against", path=data.source)
    top = int(data.labels.max())
    if top >= num_classes:
        raise WemoeError(f"task '{task}': labels go up to {top} but the head has {num_classes} classes", path=data.source)
    if data.classes is not None and len(data.classes) != num_classes:
        raise WemoeError(f"task '{task}': data has {len(data.classes)} classes but the head has {num_classes}", path=data.source)
