"""ViT architecture descriptions: known names, HF configs, JSON files, or shapes.

The weights alone do not say which activation a model was trained with (GELU vs
QuickGELU give silently different outputs), nor its head count; both are
recorded explicitly in every output so a merged model rebuilds exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wemoe.core import json_text
from wemoe.errors import WemoeError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ViTArch:
    width: int
    depth: int
    heads: int
    patch_size: int
    image_size: int
    mlp_width: int
    activation: str = "gelu"
    embed_dim: int | None = None  # output size of the projection; None when there is none
    pre_norm: bool = True  # CLIP ViTs normalise the token sequence before the blocks
    patch_bias: bool = False
    layer_norm_eps: float = 1e-5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    source: str = field(default="inferred", compare=False)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        return self.embed_dim if self.embed_dim is not None else self.width

    def summary(self) -> str:
        """One line for plans, ``inspect`` and logs."""
        embed = f" embed {self.embed_dim}" if self.embed_dim is not None else ""
        return (
            f"width {self.width} depth {self.depth} heads {self.heads} patch {self.patch_size} image {self.image_size} "
            f"mlp {self.mlp_width}{embed} activation {self.activation}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "json") -> ViTArch:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise WemoeError(f"unknown architecture field(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                value = d[key]
                ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                if not ok or not all(math.isfinite(v) for v in value) or (key == "std" and min(value) <= 0):
                    raise WemoeError(f"architecture field {key} must be 3 finite numbers{' above 0' if key == 'std' else ''}, got {str(value)[:60]}")
                d[key] = tuple(float(v) for v in value)
        eps = d.get("layer_norm_eps", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise WemoeError(f"architecture field layer_norm_eps must be a number between 0 and 1, got {str(eps)[:60]}")
        d.setdefault("source", source)
        try:
            return cls(**d)
        except TypeError as exc:
            raise WemoeError(f"incomplete architecture description: {exc}") from None


@dataclass(frozen=True)
class TextArch:
    """A CLIP text tower: a causal transformer over BPE tokens, read at the end-of-text token.

    Its blocks have the image tower's canonical layout, so the same block code runs
    both; heads and activation are not in the weights (see ``wemoe.clip.text_tower``).
    """

    width: int
    depth: int
    heads: int
    mlp_width: int
    context_length: int
    vocab_size: int
    embed_dim: int
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5

    def summary(self) -> str:
        return (
            f"width {self.width} depth {self.depth} heads {self.heads} mlp {self.mlp_width} context {self.context_length} "
            f"vocab {self.vocab_size} embed {self.embed_dim} activation {self.activation}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clip(width: int, depth: int, patch: int, embed: int, act: str, image: int = 224) -> dict[str, Any]:
    return dict(width=width, depth=depth, heads=width // 64, patch_size=patch, image_size=image, mlp_width=4 * width, activation=act, embed_dim=embed)


KNOWN_ARCHS: dict[str, dict[str, Any]] = {}
for _name, (_w, _d, _p, _e) in {
    "ViT-B-32": (768, 12, 32, 512),
    "ViT-B-16": (768, 12, 16, 512),
    "ViT-L-14": (1024, 24, 14, 768),
}.items():
    KNOWN_ARCHS[_name] = _clip(_w, _d, _p, _e, "gelu")
    KNOWN_ARCHS[f"{_name}-quickgelu"] = _clip(_w, _d, _p, _e, "quick_gelu")
for _timm, _oc in {
    "vit_base_patch32_clip_224": "ViT-B-32",
    "vit_base_patch16_clip_224": "ViT-B-16",
    "vit_large_patch14_clip_224": "ViT-L-14",
}.items():
    KNOWN_ARCHS[_timm] = KNOWN_ARCHS[_oc]
    KNOWN_ARCHS[_timm.replace("_clip_", "_clip_quickgelu_")] = KNOWN_ARCHS[f"{_oc}-quickgelu"]


def arch_from_name_or_file(spec: str) -> dict[str, Any]:
    """Resolve ``--arch``: a known name or a JSON file with (some of) ViTArch's fields."""
    if spec in KNOWN_ARCHS:
        return dict(KNOWN_ARCHS[spec], source=f"--arch {spec}")
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json_text.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WemoeError(f"cannot read architecture JSON ({exc})", path=path) from None
        if not isinstance(data, dict):
            raise WemoeError("architecture JSON must be an object", path=path)
        return dict(data, source=f"--arch {path.name}")
    raise WemoeError(f"unknown architecture '{spec}' (known: {', '.join(sorted(KNOWN_ARCHS))}, or a JSON file)")


def arch_from_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Read a CLIPVisionConfig or the vision_config of a CLIPConfig."""
    vc = config.get("vision_config", config)
    out: dict[str, Any] = {}
    mapping = {
        "hidden_size": "width",
        "num_hidden_layers": "depth",
        "num_attention_heads": "heads",
        "patch_size": "patch_size",
        "image_size": "image_size",
        "intermediate_size": "mlp_width",
        "layer_norm_eps": "layer_norm_eps",
    }
    for hf_key, key in mapping.items():
        if hf_key in vc:
            out[key] = vc[hf_key]
    act = vc.get("hidden_act")
    if act is not None:
        if act not in ("quick_gelu", "gelu"):
            raise WemoeError(f"unsupported hidden_act '{act}' in config.json (supported: gelu, quick_gelu)")
        out["activation"] = act
    proj = config.get("projection_dim", vc.get("projection_dim"))
    if proj is not None:
        out["embed_dim"] = proj
    out["source"] = "config.json"
    return out


ARCH_METADATA_KEYS = {"width", "depth", "heads", "patch_size", "image_size", "mlp_width", "activation", "embed_dim", "layer_norm_eps"}


def arch_from_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """Architecture hints stored as safetensors header strings (wemoe outputs, the zoo)."""
    out: dict[str, Any] = {}
    if "architecture" in metadata:
        try:
            stored = json_text.loads(metadata["architecture"])
        except json.JSONDecodeError:
            stored = None
        if isinstance(stored, dict):  # anything else is no hint, like text that is not JSON
            out.update(stored)
    aliases = {"layers": "depth"}
    for key, value in metadata.items():
        key = aliases.get(key, key)
        if key in ARCH_METADATA_KEYS and key not in out:
            try:
                out[key] = value if key == "activation" else (float(value) if key == "layer_norm_eps" else int(value))
            except ValueError:
                raise WemoeError(f"file metadata '{key}' is not a number: {value!r}") from None
    if out:
        out["source"] = "file metadata"
    return out


def resolve_arch(inferred: dict[str, Any], *hints: dict[str, Any]) -> ViTArch:
    """Combine shape-inferred fields with hints (later hints win) into a ViTArch.

    A hint may not contradict a shape: that means the weights and the claimed
    architecture disagree, which would silently produce garbage.
    """
    merged = dict(inferred)
    sources = []
    for hint in hints:
        for key, value in hint.items():
            if key == "source":
                sources.append(str(value))
                continue
            if key in ("width", "depth", "patch_size", "image_size", "mlp_width", "embed_dim") and key in inferred and inferred[key] != value:
                raise WemoeError(f"architecture says {key}={value} but the weights have {key}={inferred[key]}")
            merged[key] = value
    merged["source"] = ", ".join(sources) if sources else "inferred from shapes"
    if "heads" not in merged:
        merged["heads"] = max(1, merged["width"] // 64)
    for key in ("width", "depth", "heads", "patch_size", "image_size", "mlp_width"):
        value = merged.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise WemoeError(f"architecture field {key} must be a positive integer, got {value!r}")
    if merged["width"] % merged["heads"]:
        raise WemoeError(f"width {merged['width']} is not divisible by heads {merged['heads']}")
    arch = ViTArch.from_dict(merged, source=merged["source"])
    if arch.activation not in ("gelu", "quick_gelu"):
        raise WemoeError(f"unsupported activation '{arch.activation}' (supported: gelu, quick_gelu)")
    return arch
