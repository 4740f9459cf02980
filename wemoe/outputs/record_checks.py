"""An output directory read back is untrusted input: its record and heads are checked before anything is built.

Order: the record's schema and ranges (:func:`check_record`), then the record against
the tensors' shapes read from the file headers (:func:`check_moe_shapes`,
:func:`check_plain_arch`), then values (:func:`check_finite`); stored heads are read by
:func:`load_stored_heads` with the checks an input head gets. Only then is a module built,
so a record that claims a depth of 10^9 or a zero head count ends in one line, not in
memory growing without end or an internal error.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wemoe.core.arch import ViTArch
from wemoe.core.runtime import DTYPES
from wemoe.errors import WemoeError
from wemoe.io.safetensors_io import load_tensors
from wemoe.io.sources import TensorSource
from wemoe.model.heads import Head
from wemoe.moe.block import COEF_GUARDS, GROUPS
from wemoe.moe.experts.int8 import EXPERT_DTYPES
from wemoe.moe.unseen import FALLBACKS
from wemoe.outputs.layout import HEADS_FILE, MOE_SECTION
from wemoe.schemes import get_scheme

MAX_RECORD_BYTES = 16 << 20  # a record is a few KiB; its diagnostics a few more
MAX_TASKS = 1024
# generous bounds on the architecture a record may claim; the tensors then have to agree exactly
ARCH_LIMITS = {"width": 1 << 16, "depth": 1024, "heads": 1 << 12, "patch_size": 1 << 12, "image_size": 1 << 14, "mlp_width": 1 << 18, "embed_dim": 1 << 16}


def _bad(name: str, message: str, path: Path) -> WemoeError:
    return WemoeError(f"{name}: {message}", path=path)


def parse_record(text: str) -> Any:
    """JSON (NaN stays readable: a diverged run records its losses so); nesting too deep for the
    parser is a ValueError like any other malformed record. Every field a reader uses is then checked finite."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_arch(arch: Mapping[str, Any], path: Path, name: str) -> None:
    for key, high in ARCH_LIMITS.items():
        value = arch.get(key)
        if key == "embed_dim" and value is None:
            continue
        if not _int(value, 1, high):
            raise _bad(name, f"architecture field '{key}' must be an integer from 1 to {high}, got {reprlib.repr(value)}", path)
    if arch["width"] % arch["heads"]:
        raise _bad(name, f"architecture width {arch['width']} is not divisible by heads {arch['heads']}", path)
    if arch["patch_size"] > arch["image_size"]:
        raise _bad(name, f"architecture patch_size {arch['patch_size']} is larger than image_size {arch['image_size']}", path)
    if arch.get("activation", "gelu") not in ("gelu", "quick_gelu"):
        raise _bad(name, f"architecture activation must be gelu or quick_gelu, got {reprlib.repr(arch.get('activation'))}", path)
    for key in ("pre_norm", "patch_bias"):
        if key in arch and not isinstance(arch[key], bool):
            raise _bad(name, f"architecture field '{key}' must be true or false", path)
    eps = arch.get("layer_norm_eps", 1e-5)
    if not _number(eps) or not 0 < eps < 1:
        raise _bad(name, "architecture field 'layer_norm_eps' must be a number between 0 and 1", path)
    for key in ("mean", "std"):
        if key not in arch:
            continue
        value = arch[key]
        if not isinstance(value, list) or len(value) != 3 or not all(_number(v) for v in value) or (key == "std" and min(value) <= 0):
            raise _bad(name, f"architecture field '{key}' must be 3 finite numbers{' above 0' if key == 'std' else ''}", path)
    if "source" in arch and not isinstance(arch["source"], str):
        raise _bad(name, "architecture field 'source' must be a string", path)


def _check_moe_section(moe: Mapping[str, Any], depth: int, tasks: list[str], path: Path, name: str) -> None:
    blocks = moe.get("moe_blocks")
    if not isinstance(blocks, list) or not blocks or not all(_int(b, 0, depth - 1) for b in blocks) or len(set(blocks)) != len(blocks):
        raise _bad(name, f"'{MOE_SECTION}.moe_blocks' must list distinct blocks of 0..{depth - 1}", path)
    groups = moe.get("groups", ["mlp"])
    if not isinstance(groups, list) or not groups or not all(g in GROUPS for g in groups) or len(set(groups)) != len(groups):
        raise _bad(name, f"'{MOE_SECTION}.groups' must list distinct groups of {', '.join(GROUPS)}", path)
    if not _number(moe.get("lambda")):
        raise _bad(name, f"'{MOE_SECTION}.lambda' must be a finite number", path)
    if "router" not in moe and not _int(moe.get("router_layers"), 0, 2):  # format 1 names its router by its layers
        raise _bad(name, f"'{MOE_SECTION}.router_layers' must be 0, 1 or 2 when no router is named", path)
    if moe.get("router_layers") is not None and not _int(moe["router_layers"], 0, 64):
        raise _bad(name, f"'{MOE_SECTION}.router_layers' must be null or an integer from 0 to 64", path)
    if "router" in moe and not isinstance(moe["router"], str):
        raise _bad(name, f"'{MOE_SECTION}.router' must be a router name", path)
    for key in ("router_options", "expert_store"):
        if moe.get(key) is not None and not isinstance(moe[key], dict):
            raise _bad(name, f"'{MOE_SECTION}.{key}' must be a mapping", path)
    if moe.get("rank") is not None and not _int(moe["rank"], 1, 1 << 16):
        raise _bad(name, f"'{MOE_SECTION}.rank' must be null or a positive integer", path)
    if "unseen_components" in moe and not _int(moe["unseen_components"], 1, 4096):
        raise _bad(name, f"'{MOE_SECTION}.unseen_components' must be an integer from 1 to 4096", path)
    if moe.get("expert_dtype", "float32") not in EXPERT_DTYPES:
        raise _bad(name, f"'{MOE_SECTION}.expert_dtype' must be one of {', '.join(EXPERT_DTYPES)}", path)
    coef = moe.get("coef_range")
    if coef is not None and (not isinstance(coef, list) or len(coef) != 2 or not all(_number(c) for c in coef) or coef[0] > coef[1]):
        raise _bad(name, f"'{MOE_SECTION}.coef_range' must be null or [low, high] with low <= high", path)
    for key in ("coef_guard", "unseen"):
        if key in moe and not isinstance(moe[key], str):
            raise _bad(name, f"'{MOE_SECTION}.{key}' must be a string", path)
    if moe.get("unseen", "route") not in FALLBACKS:
        raise _bad(name, f"'{MOE_SECTION}.unseen' must be one of {', '.join(FALLBACKS)}", path)
    if moe.get("coef_guard", "clamp") not in COEF_GUARDS:
        raise _bad(name, f"'{MOE_SECTION}.coef_guard' must be one of {', '.join(COEF_GUARDS)}", path)
    if "rest" in moe and not isinstance(moe["rest"], bool):
        raise _bad(name, f"'{MOE_SECTION}.rest' must be true or false", path)
    if "experts" in moe and moe["experts"] != tasks:
        raise _bad(name, f"'{MOE_SECTION}.experts' does not list the record's tasks", path)


def _mapping_or_none(value: Any) -> bool:
    return value is None or isinstance(value, dict)


def _check_adaptation(section: Mapping[str, Any], tasks: list[str], path: Path, name: str, where: str) -> None:
    """What the model card and ``wemoe export`` read of an adaptation: data per task, losses, warnings."""
    adaptation = section.get("adaptation")
    if adaptation is None:
        return
    if not isinstance(adaptation, dict):
        raise _bad(name, f"'{where}.adaptation' must be a mapping", path)
    data = adaptation.get("data")
    if not _mapping_or_none(data) or not all(t in tasks and isinstance(d, dict) for t, d in (data or {}).items()):
        raise _bad(name, f"'{where}.adaptation.data' must map task names of 'tasks' to their data", path)
    for task, d in (data or {}).items():
        if not isinstance(d.get("path"), (str, type(None))):
            raise _bad(name, f"'{where}.adaptation.data.{task}.path' must be a path", path)
    for key in ("initial_loss", "final_loss"):
        value = adaptation.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _bad(name, f"'{where}.adaptation.{key}' must be a number", path)
    if adaptation.get("final_loss") is not None and adaptation.get("initial_loss") is None:
        raise _bad(name, f"'{where}.adaptation' has a final loss but no initial loss", path)
    warnings = adaptation.get("warnings")
    if warnings is not None and (not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings)):
        raise _bad(name, f"'{where}.adaptation.warnings' must list messages", path)
    if not _mapping_or_none(adaptation.get("diagnostics")):
        raise _bad(name, f"'{where}.adaptation.diagnostics' must be a mapping", path)


def _check_sections(cfg: Mapping[str, Any], tasks: list[str], path: Path, name: str) -> None:
    """The parts of a record that the model card, ``inspect`` and ``export`` read, besides the model's description."""
    for key in ("inputs", "versions", "model_config"):
        if not _mapping_or_none(cfg.get(key)):
            raise _bad(name, f"'{key}' must be a mapping", path)
    inputs = cfg.get("inputs") or {}
    if not _mapping_or_none(inputs.get("base")) or not _mapping_or_none(inputs.get("tasks")):
        raise _bad(name, "'inputs' must hold a 'base' mapping and a 'tasks' mapping", path)
    if not all(isinstance(t, dict) for t in (inputs.get("tasks") or {}).values()):
        raise _bad(name, "'inputs.tasks' must map task names to mappings", path)
    notes = cfg.get("notes")
    if notes is not None and (not isinstance(notes, list) or not all(isinstance(n, str) for n in notes)):
        raise _bad(name, "'notes' must list messages", path)
    if cfg.get("source") is not None and not isinstance(cfg["source"], str):
        raise _bad(name, "'source' must be a path", path)
    if "seed" in cfg and not _int(cfg["seed"], 0, 2**64):
        raise _bad(name, "'seed' must be a non-negative integer", path)
    try:
        get_scheme(cfg["scheme"])
    except WemoeError as exc:
        raise _bad(name, str(exc), path) from None
    section_name = MOE_SECTION if isinstance(cfg.get(MOE_SECTION), dict) else cfg["method"]
    section = cfg.get(section_name)
    if isinstance(section, dict):
        _check_adaptation(section, tasks, path, name, section_name)


def check_record(cfg: Mapping[str, Any], path: Path, name: str) -> None:
    """Schema and ranges of a record whose ``format`` is wemoe's: every field a reader uses, before any is used."""
    if not _int(cfg.get("format_version"), 1, 1 << 30):
        raise _bad(name, "'format_version' must be a positive integer", path)
    for key in ("method", "scheme"):
        if not isinstance(cfg.get(key), str) or not cfg[key]:
            raise _bad(name, f"'{key}' is missing or not a name", path)
    tasks = cfg.get("tasks")
    if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_TASKS or not all(isinstance(t, str) and t for t in tasks):
        raise _bad(name, f"'tasks' must list 1 to {MAX_TASKS} task names", path)
    if len(set(tasks)) != len(tasks):
        raise _bad(name, "'tasks' names a task twice", path)
    if cfg.get("prefix") is not None and not isinstance(cfg["prefix"], str):
        raise _bad(name, "'prefix' must be a string", path)
    if cfg.get("dtype") is not None and (not isinstance(cfg["dtype"], str) or cfg["dtype"] not in DTYPES):
        raise _bad(name, f"'dtype' must be one of {', '.join(DTYPES)}", path)
    if cfg.get("parameters") is not None and not isinstance(cfg["parameters"], dict):
        raise _bad(name, "'parameters' must be a mapping", path)
    heads = cfg.get("heads")
    if heads is not None and (not isinstance(heads, list) or not all(isinstance(h, str) and h in tasks for h in heads)):
        raise _bad(name, "'heads' must list task names of 'tasks'", path)
    arch = cfg.get("architecture")
    if not isinstance(arch, dict):
        raise _bad(name, "'architecture' is missing or not a mapping", path)
    _check_arch(arch, path, name)
    _check_sections(cfg, tasks, path, name)
    moe = cfg.get(MOE_SECTION)
    if isinstance(moe, dict):
        _check_moe_section(moe, arch["depth"], tasks, path, name)


def _shape(source: TensorSource, key: str, keys: set[str]) -> tuple[int, ...] | None:
    return tuple(source.shape(key)) if key in keys else None


def check_moe_shapes(arch: ViTArch, tasks: list[str], source: TensorSource, path: Path) -> None:
    """The record's architecture against a mixture of experts' tensor shapes (file headers only), before the module is built."""
    keys = set(source.keys())
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if blocks != set(range(arch.depth)):
        found = f"blocks 0..{max(blocks)}" if blocks else "no blocks"
        raise WemoeError(f"config.json says depth {arch.depth} but the model file has {found}", path=path)
    expected = {
        "blocks.0.norm1.weight": (arch.width,),
        "pos_embed": (1, arch.num_tokens, arch.width),
        "cls_token": (1, 1, arch.width),
        "patch_embed.proj.weight": (arch.width, 3, arch.patch_size, arch.patch_size),
        "head.weight": (arch.embed_dim, arch.width) if arch.embed_dim is not None else None,
    }
    for b in range(arch.depth):
        expected[f"blocks.{b}.mlp.fc1.weight"] = (arch.mlp_width, arch.width)
    for key, want in expected.items():
        got = _shape(source, key, keys)
        if got is not None and got != want:
            what = "no projection" if want is None else list(want)
            raise WemoeError(f"config.json's architecture ({arch.summary()}) does not match the model file: '{key}' is {list(got)}, expected {what}", path=path)
    router_outputs = {shape[0] for k in keys if re.match(r"^blocks\.\d+\.routers\.[a-z]+\.out\.weight$", k) and len(shape := tuple(source.shape(k))) == 2}
    if router_outputs and router_outputs != {len(tasks)}:
        raise WemoeError(f"config.json lists {len(tasks)} tasks but the routers choose among {sorted(router_outputs)} experts", path=path)


def _check_optional_tensors(arch: ViTArch, keys: set[str], path: Path) -> None:
    """The record's yes/no fields against the tensors that exist: a patch bias, a norm before the blocks."""
    for field_name, key in (("patch_bias", "patch_embed.proj.bias"), ("pre_norm", "norm_pre.weight")):
        if getattr(arch, field_name) != (key in keys):
            raise WemoeError(
                f"config.json says {field_name}={getattr(arch, field_name)} but the model file {'has' if key in keys else 'has no'} '{key}'", path=path
            )


def check_plain_arch(recorded: ViTArch, found: ViTArch, keys: list[str], path: Path) -> None:
    """A plain output's record against the architecture its tensors have (``keys``: canonical tensor names)."""
    for key in ("width", "depth", "heads", "patch_size", "image_size", "mlp_width", "embed_dim", "activation"):
        if getattr(recorded, key) != getattr(found, key):
            raise WemoeError(f"config.json says {key}={getattr(recorded, key)} but the model file has {key}={getattr(found, key)}", path=path)
    _check_optional_tensors(recorded, set(keys), path)


def check_finite(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """NaN or Inf in a stored tensor: the model would run and report a meaningless number."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WemoeError("contains NaN or Inf values", path=path, tensor=key)


def load_stored_heads(path: Path, tasks: list[str], feature_dim: int) -> dict[str, Head]:
    """``heads.safetensors`` of an output, with the checks an input head gets: names, shapes, finite values, metadata."""
    file = path / HEADS_FILE
    tensors, meta = load_tensors(file)
    names: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        task, _, part = key.rpartition(".")
        if part not in ("weight", "bias") or task not in tasks:
            raise WemoeError(f"unexpected tensor (heads are '<task>.weight' and '<task>.bias' for the tasks {', '.join(tasks)[:200]})", path=file, tensor=key)
        names.setdefault(task, {})[part] = tensor
    heads = {}
    for task, parts in names.items():
        weight, bias = parts.get("weight"), parts.get("bias")
        if weight is None:
            raise WemoeError(f"head of task '{task}' has a bias but no weight", path=file)
        if not weight.is_floating_point() or weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] != feature_dim:
            raise WemoeError(
                f"head weight must be [classes >= 1, {feature_dim}] floats, got {list(weight.shape)} {weight.dtype}", path=file, tensor=f"{task}.weight"
            )
        if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (weight.shape[0],)):
            raise WemoeError(f"head bias must be [{weight.shape[0]}] floats, got {list(bias.shape)}", path=file, tensor=f"{task}.bias")
        check_finite({f"{task}.weight": weight, **({f"{task}.bias": bias} if bias is not None else {})}, file)
        normalize = meta.get(f"{task}.normalize", "false")
        if normalize not in ("true", "false"):
            raise WemoeError(f"metadata '{task}.normalize' must be true or false", path=file)
        classes = None
        if f"{task}.classes" in meta:
            try:
                classes = parse_record(meta[f"{task}.classes"])
            except ValueError:
                raise WemoeError(f"metadata '{task}.classes' is not valid JSON", path=file) from None
            if not isinstance(classes, list) or len(classes) != weight.shape[0] or not all(isinstance(c, str) for c in classes):
                raise WemoeError(f"metadata '{task}.classes' must list {weight.shape[0]} class names", path=file)
        heads[task] = Head(weight.float(), None if bias is None else bias.float(), normalize == "true", classes, str(file))
    return heads


__all__ = ["MAX_RECORD_BYTES", "check_finite", "check_moe_shapes", "check_plain_arch", "check_record", "load_stored_heads", "parse_record"]
