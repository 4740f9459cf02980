"""The text tower of a full CLIP checkpoint, read in canonical form and checked against its image tower.

Like the image tower (``wemoe.checkpoints.checkpoint``), tensors come through
``wemoe.io.sources`` (never transformers) and are renamed by the rules in
``wemoe.schemes.text``. What shapes cannot tell is taken from the files: an HF
``config.json``'s ``text_config`` (heads, activation), else the image tower's
activation (open_clip builds both towers with one) and one head per 64 channels,
the rule every OpenAI-style CLIP text tower follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from wemoe.checkpoints.checkpoint import Checkpoint, open_checkpoint
from wemoe.checkpoints.inputs import sha256_files
from wemoe.clip.text_transformer import TextTransformer, build_text_transformer
from wemoe.clip.tokenizer import VOCAB_SIZE
from wemoe.core.arch import TextArch
from wemoe.errors import WemoeError
from wemoe.schemes import SchemeMatch
from wemoe.schemes.rules import BLOCK_PARTS
from wemoe.schemes.text import TEXT_REQUIRED, detect_text_scheme, logit_scale_key


@dataclass
class TextTower:
    path: Path
    scheme: str
    arch: TextArch
    model: TextTransformer
    logit_scale: float  # exp of the stored log scale: what zero-shot logits are multiplied by
    sha256: str


def _shape(image: Checkpoint, match: SchemeMatch, key: str) -> tuple[int, ...]:
    rule = match.scheme.rule_for(key)
    return rule.conversion.shape([image.source.shape(n) for n in match.native_of[key]])


def _text_arch(image: Checkpoint, match: SchemeMatch, path: Path) -> TextArch:
    block_keys = [f"blocks.{n}.{part}" for n in range(match.depth) for part in BLOCK_PARTS]
    missing = [k for k in (*TEXT_REQUIRED, *block_keys) if k not in match.native_of]
    if missing or match.depth == 0:
        lacking = missing[0] if missing else "transformer blocks"
        raise WemoeError(f"incomplete {match.scheme.name} text tower (no {lacking})", path=path)
    vocab, width = _shape(image, match, "token_embed.weight")
    context = _shape(image, match, "pos_embed")[0]
    embed, proj_in = _shape(image, match, "proj.weight")
    if proj_in != width:
        raise WemoeError(f"the text projection takes {proj_in} features but the text tower is {width} wide", path=path)
    image_embed = image.arch.embed_dim
    if image_embed is None:
        raise WemoeError("the image tower has no projection, so image and text embeddings cannot be compared", path=path)
    if embed != image_embed:
        raise WemoeError(f"the text tower projects to {embed} dimensions but the image projection to {image_embed}: not one CLIP model", path=path)
    if vocab != VOCAB_SIZE:
        raise WemoeError(f"the text tower has {vocab} token embeddings; CLIP's tokenizer has {VOCAB_SIZE}", path=path)
    hf = (image.source.config or {}).get("text_config") or {}
    heads = int(hf.get("num_attention_heads", max(1, width // 64)))
    if width % heads:
        raise WemoeError(f"text width {width} is not divisible by {heads} attention heads", path=path)
    activation = hf.get("hidden_act", image.arch.activation)
    if activation not in ("gelu", "quick_gelu"):
        raise WemoeError(f"unsupported text hidden_act '{activation}' (supported: gelu, quick_gelu)", path=path)
    return TextArch(
        width=width,
        depth=match.depth,
        heads=heads,
        mlp_width=_shape(image, match, "blocks.0.mlp.fc1.weight")[0],
        context_length=context,
        vocab_size=vocab,
        embed_dim=embed,
        activation=activation,
        layer_norm_eps=float(hf.get("layer_norm_eps", image.arch.layer_norm_eps)),
    )


MAX_LOG_SCALE = 60.0  # exp(60) ~ 1e26: far past any trained CLIP, far below float32's limit


def _logit_scale(image: Checkpoint, match: SchemeMatch, path: Path) -> float:
    key = logit_scale_key(image.source.keys(), match.prefix)
    if key is None:
        raise WemoeError("no 'logit_scale' beside the text tower (zero-shot heads are scaled by it)", path=path)
    value = image.source.get(key).float()
    if value.numel() != 1 or not math.isfinite(value.item()):
        raise WemoeError("logit_scale must be one finite number", path=path, tensor=key)
    if value.item() > MAX_LOG_SCALE:  # exp() would overflow float32 head weights to Inf
        raise WemoeError(f"logit_scale {value.item():g} is past {MAX_LOG_SCALE} (CLIP's is ln 100 = 4.6)", path=path, tensor=key)
    return math.exp(value.item())


def open_text_tower(path: str | Path, arch: str | dict | None = None) -> TextTower:
    """The text tower of a full CLIP checkpoint (open_clip file or HF ``CLIPModel`` folder), validated.

    ``arch`` is the image tower's architecture hint (``--arch``): its activation is the text tower's too.
    """
    p = Path(path)
    image = open_checkpoint(p, arch)
    match = detect_text_scheme(image.source.keys(), str(p))
    for extra in match.extras:
        if image.source.dtype(extra).is_floating_point:
            raise WemoeError(f"tensor is not part of a CLIP text tower that wemoe understands ({match.scheme.name} layout)", path=p, tensor=extra)
    text_arch = _text_arch(image, match, p)
    state: dict[str, torch.Tensor] = {}
    for key, names in match.native_of.items():
        tensor = match.scheme.rule_for(key).conversion.to_canonical([image.source.get(n) for n in names]).float()
        if not bool(torch.isfinite(tensor).all()):
            raise WemoeError("contains NaN or Inf values", path=p, tensor=names[0])
        state[key] = tensor
    try:
        model = build_text_transformer(text_arch, state)
    except RuntimeError as exc:
        raise WemoeError(f"text tower does not fit its shapes ({str(exc).splitlines()[0]})", path=p) from None
    return TextTower(p, match.scheme.name, text_arch, model, _logit_scale(image, match, p), sha256_files(image.source.files()))
