"""Rule tables for the three supported key schemes.

A rule ties one canonical tensor to one or more native tensors plus the reshape
that converts between them (e.g. HF's separate q/k/v projections <-> one qkv).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from wemoe.errors import WemoeError

Shape = tuple[int, ...]

BLOCK_PARTS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
MLP_SUFFIXES = ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
GLOBAL_KEYS = (
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm_pre.weight",
    "norm_pre.bias",
    "norm.weight",
    "norm.bias",
    "head.weight",
    "head.bias",
)


@dataclass(frozen=True)
class Conversion:
    """How native tensors become one canonical tensor and back."""

    to_canonical: Callable[[list[torch.Tensor]], torch.Tensor]
    to_native: Callable[[torch.Tensor], list[torch.Tensor]]
    shape: Callable[[list[Shape]], Shape]


SAME = Conversion(lambda ts: ts[0], lambda t: [t], lambda ss: ss[0])
TRANSPOSE = Conversion(lambda ts: ts[0].t().contiguous(), lambda t: [t.t().contiguous()], lambda ss: tuple(reversed(ss[0])))
VECTOR_AS_TOKEN = Conversion(lambda ts: ts[0].reshape(1, 1, -1), lambda t: [t.reshape(-1)], lambda ss: (1, 1) + ss[0])
ADD_BATCH_DIM = Conversion(lambda ts: ts[0].unsqueeze(0), lambda t: [t.squeeze(0)], lambda ss: (1,) + ss[0])
CONCAT3 = Conversion(
    lambda ts: torch.cat(ts, 0),
    lambda t: list(t.chunk(3, 0)),
    lambda ss: (sum(s[0] for s in ss),) + ss[0][1:],
)


@dataclass(frozen=True)
class Rule:
    canonical: str  # may contain {n}
    native: tuple[str, ...]  # relative to the scheme prefix, may contain {n}
    conversion: Conversion = SAME


@dataclass(frozen=True)
class SchemeMatch:
    """The native keys a detected scheme maps to each canonical key."""

    scheme: Scheme
    prefix: str
    depth: int
    native_of: dict[str, tuple[str, ...]]  # canonical key -> full native keys
    extras: tuple[str, ...]  # keys of the tower that no rule uses (integer buffers only)
    ignored: tuple[str, ...]  # keys outside the tower (the other tower, logit scale)


@dataclass(frozen=True)
class Scheme:
    name: str
    anchor: str  # native key (relative to prefix) that identifies the scheme
    confirm: str  # a second native key that must sit beside the anchor (tells the image tower from a text tower)
    block_regex: str  # finds block indices in native keys (relative to prefix)
    roots: tuple[str, ...]  # native roots (relative to prefix) of the tower this scheme reads; "" = all
    rules: tuple[Rule, ...]
    zero_only: tuple[str, ...] = ()  # canonical keys this layout cannot store unless all zeros

    def find_prefix(self, keys: Sequence[str]) -> str | None:
        keyset = set(keys)
        for k in keys:
            if k.endswith(self.anchor):
                prefix = k[: len(k) - len(self.anchor)]
                if (prefix == "" or prefix.endswith(".")) and prefix + self.confirm in keyset:
                    return prefix
        return None

    def match(self, keys: Sequence[str], prefix: str, path: str | None = None) -> SchemeMatch:
        vision = [k for k in keys if k.startswith(prefix) and any(k[len(prefix) :].startswith(r) for r in self.roots)]
        ignored = tuple(k for k in keys if k not in set(vision))
        rx = re.compile(self.block_regex)
        blocks = {int(m.group(1)) for k in vision if (m := rx.match(k[len(prefix) :]))}
        depth = max(blocks) + 1 if blocks else 0
        if sorted(blocks) != list(range(depth)):
            missing = sorted(set(range(depth)) - blocks)
            raise WemoeError(f"{self.name} checkpoint has no block(s) {missing}", path=path)
        present = set(vision)
        native_of: dict[str, tuple[str, ...]] = {}
        for rule in self.rules:
            indices = range(depth) if "{n}" in rule.canonical else [None]
            for n in indices:
                fmt = {"n": n} if n is not None else {}
                names = tuple(prefix + t.format(**fmt) for t in rule.native)
                found = [nm in present for nm in names]
                if all(found):
                    native_of[rule.canonical.format(**fmt)] = names
                elif any(found):
                    lacking = names[found.index(False)]
                    raise WemoeError(f"incomplete {self.name} checkpoint", path=path, tensor=lacking)
        used = {nm for names in native_of.values() for nm in names}
        extras = tuple(k for k in vision if k not in used)
        return SchemeMatch(self, prefix, depth, native_of, extras, ignored)

    def rule_for(self, canonical_key: str) -> Rule:
        generic = re.sub(r"^blocks\.\d+\.", "blocks.{n}.", canonical_key)
        for rule in self.rules:
            if rule.canonical == generic:
                return rule
        raise KeyError(canonical_key)

    def native_names(self, canonical_key: str, prefix: str) -> tuple[str, ...]:
        m = re.match(r"^blocks\.(\d+)\.", canonical_key)
        fmt = {"n": int(m.group(1))} if m else {}
        return tuple(prefix + t.format(**fmt) for t in self.rule_for(canonical_key).native)

    def to_native(self, canonical_key: str, tensor: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """Convert one canonical tensor into this layout's tensor(s)."""
        if canonical_key in self.zero_only:
            if torch.count_nonzero(tensor).item():
                raise WemoeError(f"the {self.name} layout cannot store a non-zero '{canonical_key}'")
            return {}
        rule = self.rule_for(canonical_key)
        return dict(zip(self.native_names(canonical_key, prefix), rule.conversion.to_native(tensor)))

    def native_shapes(self, canonical_key: str, shape: Shape, prefix: str) -> dict[str, Shape]:
        if canonical_key in self.zero_only:
            return {}
        probe = torch.empty(shape, device="meta")
        return {k: tuple(v.shape) for k, v in self.to_native(canonical_key, probe, prefix).items()}


def block_rules(template: dict[str, tuple[str, ...] | str], conv: dict[str, Conversion] | None = None) -> list[Rule]:
    """Rules for every canonical block part, from a template of native names (``{n}`` = block index)."""
    conv = conv or {}
    rules = []
    for part in BLOCK_PARTS:
        native = template[part]
        native = (native,) if isinstance(native, str) else native
        rules.append(Rule(f"blocks.{{n}}.{part}", native, conv.get(part, SAME)))
    return rules


def open_clip_block_rules() -> list[Rule]:
    """open_clip's residual blocks: the same names in its image and text towers."""
    oc = "transformer.resblocks.{n}."
    names = {"norm1": "ln_1", "attn.qkv": "attn.in_proj", "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    template = {}
    for part in BLOCK_PARTS:
        layer, kind = part.rsplit(".", 1)
        native = names[layer]
        template[part] = oc + (f"{native}_{kind}" if layer == "attn.qkv" else f"{native}.{kind}")
    return block_rules(template)


def hf_block_rules(tower: str | None) -> list[Rule]:
    """Hugging Face CLIP encoder layers of ``tower`` (``vision_model``, ``text_model``, or None for a bare
    tower); q, k, v kept apart."""
    hf = f"{tower}.encoder.layers.{{n}}." if tower else "encoder.layers.{n}."
    names = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    template: dict[str, tuple[str, ...] | str] = {}
    for part in BLOCK_PARTS:
        layer, kind = part.rsplit(".", 1)
        if layer == "attn.qkv":
            template[part] = tuple(f"{hf}self_attn.{x}_proj.{kind}" for x in "qkv")
        else:
            template[part] = f"{hf}{names[layer]}.{kind}"
    return block_rules(template, {"attn.qkv.weight": CONCAT3, "attn.qkv.bias": CONCAT3})


TIMM = Scheme(
    name="timm",
    anchor="blocks.0.mlp.fc1.weight",
    confirm="patch_embed.proj.weight",
    block_regex=r"blocks\.(\d+)\.",
    roots=("",),
    rules=tuple([Rule(k, (k,)) for k in GLOBAL_KEYS] + block_rules({p: f"blocks.{{n}}.{p}" for p in BLOCK_PARTS})),
)

OPEN_CLIP = Scheme(
    name="open_clip",
    anchor="transformer.resblocks.0.mlp.c_fc.weight",
    confirm="conv1.weight",
    block_regex=r"transformer\.resblocks\.(\d+)\.",
    roots=("",),
    rules=tuple(
        [
            Rule("cls_token", ("class_embedding",), VECTOR_AS_TOKEN),
            Rule("pos_embed", ("positional_embedding",), ADD_BATCH_DIM),
            Rule("patch_embed.proj.weight", ("conv1.weight",)),
            Rule("norm_pre.weight", ("ln_pre.weight",)),
            Rule("norm_pre.bias", ("ln_pre.bias",)),
            Rule("norm.weight", ("ln_post.weight",)),
            Rule("norm.bias", ("ln_post.bias",)),
            Rule("head.weight", ("proj",), TRANSPOSE),
        ]
        + open_clip_block_rules()
    ),
    zero_only=("head.bias", "patch_embed.proj.bias"),
)


def hf_vision_rules(tower: str) -> tuple[Rule, ...]:
    """A Hugging Face CLIP image tower whose keys start with ``tower`` (``vision_model.`` or nothing)."""
    return tuple(
        [
            Rule("cls_token", (f"{tower}embeddings.class_embedding",), VECTOR_AS_TOKEN),
            Rule("pos_embed", (f"{tower}embeddings.position_embedding.weight",), ADD_BATCH_DIM),
            Rule("patch_embed.proj.weight", (f"{tower}embeddings.patch_embedding.weight",)),
            Rule("norm_pre.weight", (f"{tower}pre_layrnorm.weight",)),
            Rule("norm_pre.bias", (f"{tower}pre_layrnorm.bias",)),
            Rule("norm.weight", (f"{tower}post_layernorm.weight",)),
            Rule("norm.bias", (f"{tower}post_layernorm.bias",)),
            Rule("head.weight", ("visual_projection.weight",)),
        ]
        + hf_block_rules(tower.rstrip(".") or None)
    )


# transformers 4 (every class) and 5 (CLIPVisionModelWithProjection, CLIPModel): the tower under ``vision_model.``
HF_CLIP = Scheme(
    name="hf_clip",
    anchor="vision_model.encoder.layers.0.mlp.fc1.weight",
    confirm="vision_model.embeddings.patch_embedding.weight",
    block_regex=r"vision_model\.encoder\.layers\.(\d+)\.",
    roots=("vision_model.", "visual_projection."),
    rules=hf_vision_rules("vision_model."),
    zero_only=("head.bias", "patch_embed.proj.bias"),
)

# transformers 5 ``CLIPVisionModel.save_pretrained``: the same tower without the ``vision_model.`` prefix.
# Its own layout, so that outputs are written back in it; tried after HF_CLIP, whose keys end like these.
HF_CLIP_VISION = Scheme(
    name="hf_clip_vision",
    anchor="encoder.layers.0.mlp.fc1.weight",
    confirm="embeddings.patch_embedding.weight",
    block_regex=r"encoder\.layers\.(\d+)\.",
    roots=("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "visual_projection."),
    rules=hf_vision_rules(""),
    zero_only=("head.bias", "patch_embed.proj.bias"),
)

# The layouts transformers loads (``CLIPVisionModel[WithProjection].from_pretrained``).
TRANSFORMERS_SCHEMES = (HF_CLIP.name, HF_CLIP_VISION.name)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (TIMM, OPEN_CLIP, HF_CLIP, HF_CLIP_VISION)}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise WemoeError(f"unknown key scheme '{name}' (known: {', '.join(SCHEMES)})") from None


def detect_scheme(keys: Sequence[str], path: str | None = None) -> SchemeMatch:
    """Find the one scheme whose anchor tensor is present and map its keys."""
    # HF and open_clip before timm: their keys can contain timm-looking fragments;
    # the prefixed HF layout before the bare one, whose anchor ends its keys.
    for scheme in (HF_CLIP, HF_CLIP_VISION, OPEN_CLIP, TIMM):
        prefix = scheme.find_prefix(keys)
        if prefix is not None:
            return scheme.match(keys, prefix, path)
    sample = ", ".join(list(keys)[:3]) or "no tensors"
    raise WemoeError(f"unrecognised key scheme: expected timm, open_clip or Hugging Face CLIP vision keys (found {sample} ...)", path=path)
