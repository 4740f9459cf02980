"""CLIP's tokenizer: open_clip's ``SimpleTokenizer`` (byte-level BPE; its vocabulary ships with open_clip).

``import open_clip`` imports every model family it supports, and transformers when
that is installed (about 10 s here); the tokenizer module itself needs only ftfy,
regex and torch. So it is loaded on its own from open_clip's installed files,
falling back to the ordinary import if that ever fails. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from typing import Any

import torch

from wemoe.errors import WemoeError

VOCAB_SIZE = 49408  # byte-level BPE merges + start/end of text: every OpenAI-style CLIP text tower
_MODULE = "wemoe._open_clip_tokenizer"


def _load_module() -> Any:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise WemoeError("zero-shot heads need open_clip's tokenizer: pip install open_clip_torch")
    path = f"{list(spec.submodule_search_locations)[0]}/tokenizer.py"
    try:
        file_spec = importlib.util.spec_from_file_location(_MODULE, path)
        assert file_spec is not None and file_spec.loader is not None
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[_MODULE] = module
        file_spec.loader.exec_module(module)
        return module
    except Exception:
        sys.modules.pop(_MODULE, None)
    try:
        import open_clip.tokenizer as module
    except ImportError as exc:
        raise WemoeError(f"cannot load open_clip's tokenizer ({exc})") from None
    return module


@lru_cache(maxsize=1)
def clip_tokenizer() -> Any:
    """open_clip's ``SimpleTokenizer`` (lower-cased, whitespace-cleaned, as CLIP was trained)."""
    return _load_module().SimpleTokenizer()


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """(N, context_length) token ids; prompts longer than the context are cut, keeping their end-of-text token."""
    return clip_tokenizer()(texts, context_length=context_length)
