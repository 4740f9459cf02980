"""A checkpoint seen through the canonical layout: the one representation the
merge engine, the model builder and the writers work on.

``open_checkpoint`` is where a path becomes (tensor source + key scheme +
architecture). Tensors are converted lazily, one at a time, so merges stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wemoe.core.arch import ViTArch, arch_from_hf_config, arch_from_metadata, arch_from_name_or_file, resolve_arch
from wemoe.errors import WemoeError
from wemoe.io.sources import TensorSource, open_source
from wemoe.schemes import SchemeMatch, detect_scheme


@dataclass
class Checkpoint:
    path: Path
    source: TensorSource
    match: SchemeMatch
    arch: ViTArch

    @property
    def scheme(self) -> str:
        return self.match.scheme.name

    @property
    def prefix(self) -> str:
        return self.match.prefix

    def keys(self) -> list[str]:
        """Canonical keys, in a fixed order (globals first, then blocks)."""
        return list(self.match.native_of)

    def native_names(self, key: str) -> tuple[str, ...]:
        return self.match.native_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        rule = self.match.scheme.rule_for(key)
        return rule.conversion.shape([self.source.shape(n) for n in self.native_names(key)])

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(self.native_names(key)[0])

    def get(self, key: str) -> torch.Tensor:
        rule = self.match.scheme.rule_for(key)
        return rule.conversion.to_canonical([self.source.get(n) for n in self.native_names(key)])

    def extras(self) -> tuple[str, ...]:
        return self.match.extras

    def get_extra(self, native_key: str) -> torch.Tensor:
        return self.source.get(native_key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    @property
    def metadata(self) -> dict[str, str]:
        return self.source.metadata


def _infer_arch_fields(match: SchemeMatch, shape) -> dict[str, Any]:
    if "cls_token" not in match.native_of or "pos_embed" not in match.native_of or "patch_embed.proj.weight" not in match.native_of:
        raise WemoeError("checkpoint lacks the class token, position or patch embedding of a ViT")
    if match.depth == 0:
        raise WemoeError("checkpoint has no transformer blocks")
    width = shape("cls_token")[-1]
    patch = shape("patch_embed.proj.weight")[-1]
    tokens = shape("pos_embed")[1]
    side = round((tokens - 1) ** 0.5)
    if side * side != tokens - 1:
        raise WemoeError(f"position embedding has {tokens} tokens, not 1 + a square grid")
    fields: dict[str, Any] = dict(
        width=width,
        depth=match.depth,
        patch_size=patch,
        image_size=side * patch,
        mlp_width=shape("blocks.0.mlp.fc1.weight")[0],
        pre_norm="norm_pre.weight" in match.native_of,
        patch_bias="patch_embed.proj.bias" in match.native_of,
    )
    if "head.weight" in match.native_of:
        fields["embed_dim"] = shape("head.weight")[0]
    return fields


def config_hints(source: TensorSource) -> list[dict[str, Any]]:
    hints: list[dict[str, Any]] = []
    meta = arch_from_metadata(source.metadata)
    if meta:
        hints.append(meta)
    cfg = source.config
    if cfg:
        if cfg.get("format") == "wemoe" and isinstance(cfg.get("architecture"), dict):
            hints.append(dict(cfg["architecture"], source="wemoe config.json"))
        elif "vision_config" in cfg or "hidden_size" in cfg:
            hints.append(arch_from_hf_config(cfg))
    return hints


def open_checkpoint(path: str | Path, arch: str | dict | None = None) -> Checkpoint:
    """Open ``path`` in any supported format and key scheme, in canonical form.

    ``arch`` (a known name, a JSON file path, or a dict) overrides what config
    files and metadata say; shapes must still agree with it.
    """
    source = open_source(path)
    match = detect_scheme(source.keys(), path=str(path))
    for extra in match.extras:
        if source.dtype(extra).is_floating_point:
            raise WemoeError(f"tensor is not part of a CLIP-style ViT that wemoe understands ({match.scheme.name} layout)", path=path, tensor=extra)
    probe = Checkpoint(Path(path), source, match, None)  # type: ignore[arg-type]
    try:
        inferred = _infer_arch_fields(match, probe.shape)
    except WemoeError as exc:
        raise WemoeError(str(exc), path=path) from None
    try:
        hints = config_hints(source)
    except WemoeError as exc:
        raise WemoeError(str(exc), path=path) from None
    if arch is not None:
        hints.append(arch_from_name_or_file(arch) if isinstance(arch, str) else dict(arch, source="arch argument"))
    if "head.weight" not in match.native_of:
        # transformers writes projection_dim into every CLIP vision config, CLIPVisionModel's too:
        # a tower without the projection tensor has no projection, whatever its config says
        hints = [{k: v for k, v in h.items() if k != "embed_dim"} for h in hints]
    try:
        resolved = resolve_arch(inferred, *hints)
    except WemoeError as exc:
        raise WemoeError(str(exc), path=path) from None
    return Checkpoint(Path(path), source, match, resolved)
