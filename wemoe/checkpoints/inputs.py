"""Open and validate a base and its task checkpoints BEFORE any compute.

Everything that can make a merge wrong or crash halfway is checked here, and
refused with one line naming the file and tensor: missing or extra tensors,
shape/dtype/architecture mismatches, non-finite values, duplicates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from wemoe.checkpoints.adapters import AdapterCheckpoint, is_lora_adapter, open_adapter
from wemoe.checkpoints.checkpoint import Checkpoint, config_hints, open_checkpoint
from wemoe.core.arch import arch_from_name_or_file
from wemoe.core.tasks import check_unique
from wemoe.errors import WemoeError
from wemoe.schemes import TRANSFORMERS_SCHEMES

# Fine-tuned vision-only checkpoints (e.g. FusionBench's HF CLIPVisionModel ones)
# lack the projection; it is then taken from the base unchanged.
OPTIONAL_IN_TASKS = ("head.weight", "head.bias")


@dataclass
class TaskInput:
    name: str
    checkpoint: Checkpoint
    sha256: str
    from_base: tuple[str, ...] = ()  # canonical keys absent from the task, taken from the base

    @property
    def path(self) -> Path:
        return self.checkpoint.path


@dataclass
class MergeInputs:
    base: Checkpoint
    base_sha256: str
    tasks: list[TaskInput]
    notes: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)  # said at merge time, not recorded: how to load the output

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def sha256_files(files: Sequence[Path]) -> str:
    """One hash over the files' bytes, recorded so results can be traced to their inputs."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def sha256_of(ckpt: Checkpoint) -> str:
    return sha256_files(ckpt.source.files())


def _check_finite(ckpt: Checkpoint, bar: tqdm | None) -> None:
    for key in ckpt.keys():
        t = ckpt.get(key)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise WemoeError(f"contains {bad} values", path=ckpt.path, tensor=ckpt.native_names(key)[0])
        del t
        if bar is not None:
            bar.update(1)


SHAPE_FIELDS = ("depth", "width", "mlp_width", "patch_size", "image_size")


def _architecture_difference(base: Checkpoint, task: Checkpoint) -> str | None:
    """A task of another depth or width is a fine-tune of another model: which architecture each has."""
    differ = [f for f in SHAPE_FIELDS if getattr(base.arch, f) != getattr(task.arch, f)]
    if not differ:
        return None
    describe = lambda a: ", ".join(f"{f.replace('_', ' ')} {getattr(a, f)}" for f in differ)
    return f"a ViT of {describe(task.arch)}, the base {base.path} is one of {describe(base.arch)}: a task must be a fine-tune of the base's architecture"


def _tensor_difference(base: Checkpoint, task: Checkpoint, from_base: list[str]) -> tuple[str, str] | None:
    """The first tensor the task cannot be merged on, as (what, native name); fills ``from_base``."""
    bkeys, tkeys = set(base.keys()), set(task.keys())
    for key in sorted(tkeys - bkeys):
        return f"tensor is not in the base checkpoint {base.path}", task.native_names(key)[0]
    for key in base.keys():
        if key not in tkeys:
            if key in OPTIONAL_IN_TASKS:
                from_base.append(key)
                continue
            return "missing tensor (the base has it)", base.native_names(key)[0]
        bs, ts = base.shape(key), task.shape(key)
        if bs != ts:
            return f"shape {list(ts)} does not match the base's {list(bs)} (different architecture?)", task.native_names(key)[0]
        bd, td = base.dtype(key), task.dtype(key)
        if bd != td:
            return f"dtype {str(td).replace('torch.', '')} does not match the base's {str(bd).replace('torch.', '')}", task.native_names(key)[0]
    return None


def _compare(base: Checkpoint, task: Checkpoint, base_stated: dict) -> tuple[str, ...]:
    from_base: list[str] = []
    problem = _tensor_difference(base, task, from_base)
    architecture = _architecture_difference(base, task)
    if architecture is not None:
        evidence = f" (first difference: tensor '{problem[1]}': {problem[0]})" if problem else ""
        raise WemoeError(architecture + evidence, path=task.path)
    if problem is not None:
        raise WemoeError(problem[0], path=task.path, tensor=problem[1])
    # Tasks are opened with the base's heads and activation (shapes cannot tell them);
    # a task whose own files state different ones is a different architecture.
    stated = _stated_arch(task)
    if "heads" in stated and "heads" in base_stated and stated["heads"] != base.arch.heads:
        raise WemoeError(f"{stated['heads']} attention heads, the base has {base.arch.heads}", path=task.path)
    if "activation" in stated and "activation" in base_stated and stated["activation"] != base.arch.activation:
        raise WemoeError(f"activation {stated['activation']} does not match the base's {base.arch.activation}", path=task.path)
    return tuple(from_base)


def _stated_arch(ckpt: Checkpoint, arch: str | dict | None = None) -> dict:
    """Architecture fields the checkpoint's own files (and ``arch``) state outright."""
    stated: dict = {}
    for hint in config_hints(ckpt.source):
        stated.update(hint)
    if arch is not None:
        stated.update(arch_from_name_or_file(arch) if isinstance(arch, str) else arch)
    return stated


def load_hints(base: Checkpoint) -> list[str]:
    """What a user loading the output in its library needs to know and the files cannot make right.

    A transformers image tower without a projection (``CLIPVisionModel``) has no ``visual_projection``
    to write: loaded into ``CLIPVisionModelWithProjection``, that layer would be initialised at random.
    """
    if base.scheme in TRANSFORMERS_SCHEMES and "head.weight" not in base.keys():
        return [
            "the base is a CLIPVisionModel (no visual_projection.weight): load the output with CLIPVisionModel; "
            "CLIPVisionModelWithProjection would leave visual_projection.weight missing (randomly initialised)"
        ]
    return []


def load_inputs(
    base_path: str | Path,
    tasks: Sequence[tuple[str, str | Path]],
    arch: str | dict | None = None,
    check_finite: bool = True,
    progress: bool = True,
) -> MergeInputs:
    """Open every checkpoint and validate all of them; nothing is computed yet."""
    if not tasks:
        raise WemoeError("no task checkpoints given (use --tasks NAME=PATH ...)")
    check_unique([n for n, _ in tasks], "task name")
    seen_paths: dict[Path, str] = {}
    for n, p in tasks:
        rp = Path(p).resolve()
        if rp in seen_paths:
            raise WemoeError(f"the same checkpoint is given twice (tasks '{seen_paths[rp]}' and '{n}')", path=p)
        seen_paths[rp] = n
    if is_lora_adapter(base_path):
        raise WemoeError("a LoRA adapter folder is a task, not a base: give the pretrained model it was trained on as --base", path=base_path)
    base = open_checkpoint(base_path, arch)
    notes: list[str] = []
    if base.match.ignored:
        notes.append(f"base: using the image tower only ({len(base.match.ignored)} other tensors ignored)")
    base_stated = _stated_arch(base, arch)
    hints = load_hints(base)
    opened = []
    for name, path in tasks:
        # Shapes are compared tensor by tensor below (naming the tensor); only what
        # shapes cannot tell is carried over from the base.
        if is_lora_adapter(path):
            adapter = open_adapter(path, base)
            notes.append(f"task '{name}': {adapter.describe()}; its task vector is scale * B @ A on those, zero elsewhere")
            if adapter.left_out:
                notes.append(f"task '{name}': {len(adapter.left_out)} LoRA modules outside the image tower left out")
            opened.append((name, adapter, ()))
            continue
        ckpt = open_checkpoint(path, {"heads": base.arch.heads, "activation": base.arch.activation})
        from_base = _compare(base, ckpt, base_stated)
        if from_base:
            notes.append(f"task '{name}': no projection in {Path(path).name}; taken from the base unchanged")
        if ckpt.scheme != base.scheme:
            notes.append(f"task '{name}': {ckpt.scheme} layout, converted to the base's {base.scheme} layout")
        opened.append((name, ckpt, from_base))
    if check_finite:
        checked = [ckpt for _, ckpt, _ in opened if not isinstance(ckpt, AdapterCheckpoint)]  # adapters: their factors, when read
        total = len(base.keys()) * (1 + len(checked))
        with tqdm(total=total, desc="validating", unit="tensor", disable=not progress, leave=False) as bar:
            _check_finite(base, bar)
            for ckpt in checked:
                _check_finite(ckpt, bar)
    base_hash = sha256_of(base)
    task_inputs = []
    hashes = {base_hash: "the base"}
    for name, ckpt, from_base in opened:
        digest = sha256_of(ckpt)
        if digest in hashes:
            raise WemoeError(f"identical to {hashes[digest]} (the same checkpoint given twice?)", path=ckpt.path)
        hashes[digest] = f"task '{name}'"
        task_inputs.append(TaskInput(name, ckpt, digest, from_base))
    return MergeInputs(base, base_hash, task_inputs, notes, hints)
