"""LoRA fine-tunes as tasks: a PEFT adapter folder read as the task vector it stands for.

A LoRA fine-tune changes each targeted linear layer by ``scale * B @ A`` (``A``: r x in,
``B``: out x r, ``scale = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) and nothing
else, so its task vector is exactly that on its targets and zero elsewhere: no fine-tuned
checkpoint is ever materialised. The adapter's module names are read in any key scheme
wemoe knows (Hugging Face ``q_proj``/``fc1``..., open_clip ``attn.out_proj``/``mlp.c_fc``...,
timm) and converted to canonical keys with the same rules as checkpoints (HF's q, k and v
projections land in their rows of the canonical ``qkv``).

The folder format (PEFT's ``save_pretrained``): ``adapter_config.json`` (``peft_type``
``LORA``, ``r``, ``lora_alpha``, ``rank_pattern``/``alpha_pattern``, ``use_rslora``,
``use_dora``, ``fan_in_fan_out``, ``modules_to_save``) beside ``adapter_model.safetensors``
(or ``adapter_model.bin``) holding ``base_model.model.<module>.lora_A.weight`` and
``...lora_B.weight`` (and ``lora_B.bias`` with ``lora_bias``).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wemoe.checkpoints.checkpoint import Checkpoint
from wemoe.errors import WemoeError
from wemoe.io.sources import open_source
from wemoe.schemes import SCHEMES, Scheme
from wemoe.schemes.rules import CONCAT3, HF_CLIP, HF_CLIP_VISION, OPEN_CLIP, TIMM

# the order module names are tried in: the prefixed HF layout before the bare one, whose names end its names
NAMINGS = (HF_CLIP, HF_CLIP_VISION, OPEN_CLIP, TIMM)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
KIND = "peft-lora"
# canonical weights a LoRA can target: the linear layers of the image tower (and its projection)
LINEAR_PARTS = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.(?P<param>weight|bias)$")
_WHERE = "q_proj, k_proj, v_proj, out_proj, fc1, fc2 (Hugging Face naming) or attn.out_proj, mlp.c_fc, mlp.c_proj (open_clip's)"


def is_lora_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder (not a model checkpoint)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraFactor:
    """One adapted linear layer: its change is ``scale * up @ down`` (+ ``scale * bias`` on its bias)."""

    module: str
    down: torch.Tensor  # A (r, in)
    up: torch.Tensor  # B (out, r)
    scale: float
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.double() @ self.down.double())


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    rank: int
    alpha: float
    rslora: bool
    factors: dict[str, LoraFactor]  # by module path (without PEFT's base_model.model.)
    files: list[Path]


def _number(config: dict[str, Any], key: str, default: Any, path: Path, integer: bool = False) -> Any:
    value = config.get(key, default)
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
    if bad or (integer and not isinstance(value, int)):
        kind = "a positive integer" if integer else "a positive number"
        raise WemoeError(f"{ADAPTER_CONFIG}: '{key}' must be {kind}, got {value!r}", path=path)
    return value


def _pattern(pattern: Any, key: str, module: str, default: Any, path: Path, integer: bool) -> Any:
    """PEFT's per-module override: the first key of ``rank_pattern``/``alpha_pattern`` that ends the module's name."""
    if not isinstance(pattern, dict):
        raise WemoeError(f"{ADAPTER_CONFIG}: '{key}' must be an object", path=path)
    for name, value in pattern.items():
        if re.match(rf"(.*\.)?{name}$", module):
            return _number({key: value}, key, default, path, integer)
    return default


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WemoeError(f"cannot read {ADAPTER_CONFIG} ({exc})", path=path) from None
    if not isinstance(config, dict):
        raise WemoeError(f"{ADAPTER_CONFIG} is not a JSON object", path=path)
    kind = config.get("peft_type")
    if kind != "LORA":
        raise WemoeError(f"a {kind} adapter: only LoRA adapters (peft_type LORA) can be merged as tasks", path=path)
    if config.get("use_dora"):
        raise WemoeError("a DoRA adapter (use_dora): its change is not scale * B @ A; merge a plain LoRA adapter or its merged model", path=path)
    if config.get("fan_in_fan_out"):
        raise WemoeError("fan_in_fan_out is for GPT-2-style Conv1D layers; the CLIP image tower has none (an adapter of another model?)", path=path)
    if config.get("modules_to_save"):
        raise WemoeError(
            f"the adapter also trains whole modules (modules_to_save: {config['modules_to_save']}): merge its merged model (merge_and_unload) instead",
            path=path,
        )
    return config


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    for name in ADAPTER_FILES:
        if (path / name).is_file():
            source = open_source(path / name)
            return {k: source.get(k) for k in source.keys()}, source.files()
    raise WemoeError(f"adapter folder holds no {' or '.join(ADAPTER_FILES)}", path=path)


def read_lora_adapter(path: str | Path) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter folder: config, factor pairs, ranks, finite values."""
    p = Path(path)
    config = _config(p)
    rank = _number(config, "r", 8, p, integer=True)
    alpha = _number(config, "lora_alpha", 8, p)
    rslora = bool(config.get("use_rslora", False))
    tensors, files = _tensors(p)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise WemoeError("not a LoRA factor (lora_A / lora_B): wemoe merges plain LoRA adapters only", path=p, tensor=key)
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise WemoeError("LoRA factor is not finite floating point", path=p, tensor=key)
        parts.setdefault(m.group("module"), {})[f"{m.group('which')}.{m.group('param')}"] = tensor
    if not parts:
        raise WemoeError("adapter holds no LoRA factors", path=p)
    factors = {}
    for module, got in parts.items():
        if "A.weight" not in got or "B.weight" not in got:
            raise WemoeError(f"LoRA of '{module}' lacks its lora_{'A' if 'A.weight' not in got else 'B'} weight", path=p)
        down, up = got["A.weight"], got["B.weight"]
        r = _pattern(config.get("rank_pattern") or {}, "rank_pattern", module, rank, p, True)
        a = _pattern(config.get("alpha_pattern") or {}, "alpha_pattern", module, alpha, p, False)
        if down.ndim != 2 or up.ndim != 2:
            raise WemoeError(f"LoRA target '{module}' is not a linear layer of the CLIP image tower wemoe merges ({_WHERE})", path=p)
        if down.shape[0] != r or up.shape[1] != r:
            raise WemoeError(
                f"LoRA of '{module}' has factors A {list(down.shape)}, B {list(up.shape)}: not rank {r} as {ADAPTER_CONFIG} says "
                f"(A must be [r, in], B [out, r])",
                path=p,
            )
        scale = a / math.sqrt(r) if rslora else a / r
        factors[module] = LoraFactor(module, down, up, scale, got.get("B.bias"))
    return LoraAdapter(p, rank, alpha, rslora, factors, files)


@dataclass(frozen=True)
class Target:
    """Where one adapted module lands: a canonical weight, and which of its native parts (q, k or v of HF's qkv)."""

    key: str
    part: int
    factor: LoraFactor


@functools.cache
def _module_patterns(scheme: Scheme) -> list[tuple[re.Pattern[str], str, int]]:
    """(regex over module paths with the prefix and block index as groups, canonical template, part) per linear."""
    out = []
    for rule in scheme.rules:
        generic = rule.canonical.replace("blocks.{n}.", "")
        if generic not in LINEAR_PARTS and rule.canonical != "head.weight":
            continue
        for part, native in enumerate(rule.native):
            module = re.escape(native[: -len(".weight")]).replace(r"\{n\}", r"(?P<n>\d+)")
            out.append((re.compile(rf"^(?P<prefix>(?:.*\.)?){module}$"), rule.canonical, part))
    return out


def _landing(module: str) -> tuple[Scheme, str, str, int] | None:
    """(naming, prefix, canonical key, part) of the first naming with a linear of this module path."""
    for scheme in NAMINGS:
        for rx, canonical, part in _module_patterns(scheme):
            m = rx.match(module)
            if m is not None:
                key = canonical.format(n=int(m.group("n"))) if "{n}" in canonical else canonical
                return scheme, m.group("prefix"), key, part
    return None


def resolve_targets(adapter: LoraAdapter) -> tuple[Scheme, str, list[Target], list[str]]:
    """The key scheme and prefix of the adapter's module names, where each module lands, and the modules of
    another tower (a full CLIP's text tower) that are left out."""
    found: dict[tuple[str, str], list[Target]] = {}
    unknown = []
    for module, factor in adapter.factors.items():
        hit = _landing(module)
        if hit is not None:
            scheme, prefix, key, part = hit
            found.setdefault((scheme.name, prefix), []).append(Target(key, part, factor))
        elif "text" in module:  # a full CLIP's text tower: its projection has no image-tower rule
            found.setdefault(("", "text"), []).append(Target("", 0, factor))
        else:
            unknown.append(module)
    if unknown:
        raise WemoeError(f"LoRA target '{unknown[0]}' is not a linear layer of the CLIP image tower wemoe merges ({_WHERE})", path=adapter.path)
    image = {k: v for k, v in found.items() if "text" not in k[1]}
    if len(image) > 1:  # a full CLIP: open_clip's text tower sits at the root, its image tower under visual.
        image = {k: v for k, v in image.items() if "vis" in k[1]} or image
    if not image:
        raise WemoeError("the adapter targets the text tower only; wemoe merges image towers", path=adapter.path)
    if len(image) != 1:
        towers = ", ".join(f"'{prefix}' ({name})" for name, prefix in image)
        raise WemoeError(f"cannot tell the image tower among the adapter's targets (module prefixes {towers})", path=adapter.path)
    (name, prefix), targets = next(iter(image.items()))
    left_out = [t.factor.module for k, ts in found.items() if k != (name, prefix) for t in ts]
    return SCHEMES[name], prefix, targets, left_out


class AdapterSource:
    """The adapter's files as a tensor source: hashed as the task's input; its tensors are read as factors."""

    def __init__(self, path: Path, files: list[Path]):
        self.path, self._files = path, files
        self.metadata: dict[str, str] = {}
        self.config: dict | None = None

    def keys(self) -> list[str]:
        return []

    def shape(self, key: str) -> tuple[int, ...]:
        raise KeyError(key)

    def dtype(self, key: str) -> torch.dtype:
        raise KeyError(key)

    def get(self, key: str) -> torch.Tensor:
        raise KeyError(key)

    def files(self) -> list[Path]:
        return list(self._files)


@dataclass
class AdapterCheckpoint(Checkpoint):
    """A LoRA adapter seen as a checkpoint: the base's tensors plus the adapter's changes, in canonical form.

    Task vectors are taken from :meth:`delta` directly (exact, never ``(base + delta) - base``);
    :meth:`factors` offers the adapter's own low-rank factors to low-rank expert stores.
    """

    adapter: LoraAdapter | None = None
    base: Checkpoint | None = None
    naming: Scheme | None = None
    naming_prefix: str = ""
    targets: dict[str, list[Target]] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)

    @property
    def scheme(self) -> str:
        return KIND

    def describe(self) -> str:
        assert self.adapter is not None and self.naming is not None
        a = self.adapter
        scale = "alpha / sqrt(r)" if a.rslora else "alpha / r"
        modules = sum(len(t) for t in self.targets.values())
        return f"LoRA adapter, rank {a.rank}, alpha {a.alpha:g} (scale {scale}), {modules} target modules in {self.naming.name} naming"

    def _native_shapes(self, key: str) -> list[tuple[int, ...]]:
        assert self.base is not None and self.naming is not None
        return list(self.naming.native_shapes(key, self.base.shape(key), self.naming_prefix).values())

    def delta(self, key: str) -> torch.Tensor:
        """The task vector of canonical ``key`` in float32: ``scale * B @ A`` on the adapter's targets, zero elsewhere."""
        assert self.base is not None and self.naming is not None
        weight_key = key[: -len("bias")] + "weight" if key.endswith(".bias") else key
        targets = self.targets.get(weight_key, [])
        if key.endswith(".bias"):
            targets = [t for t in targets if t.factor.bias is not None]
        if not targets:
            return torch.zeros(self.base.shape(key), dtype=torch.float32)
        shapes = self._native_shapes(key)
        parts = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        for t in targets:
            parts[t.part] = t.factor.scale * t.factor.bias.double() if key.endswith(".bias") else t.factor.delta()  # type: ignore[union-attr]
        rule = self.naming.rule_for(key)
        return rule.conversion.to_canonical(parts).float()

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``down`` (R, in), ``up`` (R, out) with ``up^T @ down`` this task's vector of weight ``key``, exactly;
        R is the sum of the ranks of the modules that make up ``key`` (0 where the adapter leaves it alone).
        None where the layout's conversion is not a row concatenation."""
        assert self.base is not None and self.naming is not None
        out_features, in_features = self.base.shape(key)
        targets = self.targets.get(key, [])
        rule = self.naming.rule_for(key)
        if len(rule.native) > 1 and rule.conversion is not CONCAT3:
            return None
        offsets = [0]
        for shape in self._native_shapes(key):
            offsets.append(offsets[-1] + shape[0])
        downs, ups = [], []
        for t in targets:
            downs.append(t.factor.down.double())
            up = torch.zeros(t.factor.rank, out_features, dtype=torch.float64)
            up[:, offsets[t.part] : offsets[t.part + 1]] = t.factor.scale * t.factor.up.double().t()
            ups.append(up)
        if not downs:
            return torch.zeros(0, in_features), torch.zeros(0, out_features)
        return torch.cat(downs).float(), torch.cat(ups).float()

    def shape(self, key: str) -> tuple[int, ...]:
        assert self.base is not None
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        assert self.base is not None
        return self.base.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        assert self.base is not None
        base = self.base.get(key)
        if not base.is_floating_point():
            return base
        return (base.double() + self.delta(key).double()).to(base.dtype)


def open_adapter(path: str | Path, base: Checkpoint) -> AdapterCheckpoint:
    """A LoRA adapter folder as a task of ``base``: validated against the base's shapes before any compute."""
    adapter = read_lora_adapter(path)
    naming, prefix, targets, left_out = resolve_targets(adapter)
    by_key: dict[str, list[Target]] = {}
    for t in targets:
        if t.key not in base.keys():
            m = re.match(r"blocks\.(\d+)\.", t.key)
            what = f"block {m.group(1)}, the base has {base.arch.depth} blocks" if m else f"'{t.key}', which the base has not"
            raise WemoeError(f"LoRA of '{t.factor.module}' adapts {what} (an adapter of another model?)", path=path)
        expected = list(naming.native_shapes(t.key, base.shape(t.key), prefix).values())[t.part]
        got = (t.factor.up.shape[0], t.factor.down.shape[1])
        if tuple(expected) != got:
            raise WemoeError(
                f"LoRA of '{t.factor.module}' is for a {list(got)} weight, the base's is {list(expected)} (an adapter of another model?)", path=path
            )
        if t.factor.bias is not None and t.factor.bias.shape != (got[0],):
            raise WemoeError(f"LoRA bias of '{t.factor.module}' has shape {list(t.factor.bias.shape)}, not [{got[0]}]", path=path)
        by_key.setdefault(t.key, []).append(t)
    source = AdapterSource(Path(path), [*adapter.files, Path(path) / ADAPTER_CONFIG])
    return AdapterCheckpoint(Path(path), source, base.match, base.arch, adapter, base, naming, prefix, by_key, left_out)


__all__ = ["AdapterCheckpoint", "LoraAdapter", "LoraFactor", "is_lora_adapter", "open_adapter", "read_lora_adapter", "resolve_targets"]
