"""``--expert-rank``: whole task vectors (``full``) or a positive rank, as the built-in stores read it."""

from __future__ import annotations

from wemoe.errors import WemoeError

RANK_HELP = "task vectors of routed weights kept whole (full) or as rank-R SVD factors"


def parse_rank(spec: str) -> int | None:
    """``full`` -> None (dense task vectors), else a positive integer rank."""
    if str(spec).strip().lower() == "full":
        return None
    try:
        rank = int(str(spec))
    except ValueError:
        raise WemoeError(f"--expert-rank must be 'full' or a positive integer, got '{spec}'") from None
    if rank < 1:
        raise WemoeError(f"--expert-rank must be at least 1, got {rank}")
    return rank


__all__ = ["RANK_HELP", "parse_rank"]
