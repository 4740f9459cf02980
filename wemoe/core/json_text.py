"""JSON from untrusted files: nesting too deep for the parser is malformed JSON, not a crash.

``json.loads`` recurses once per nesting level, so ``[[[[...]]]]`` a few kilobytes deep
raises RecursionError; every reader of a file's JSON (headers, configs, metadata) calls
:func:`loads` instead, and its ``json.JSONDecodeError`` handling then covers that too.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads``, with nesting too deep for the parser raised as ``json.JSONDecodeError``."""
    try:
        return json.loads(text)
    except RecursionError:
        doc = text if isinstance(text, str) else text[:100].decode("utf-8", "replace")
        raise json.JSONDecodeError("nested too deeply", doc, 0) from None


__all__ = ["loads"]
