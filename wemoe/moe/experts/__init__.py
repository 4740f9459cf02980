"""How routed linears keep their task vectors: expert stores, one module per kind (``--expert-store``)."""

from wemoe.moe.experts.base import EXPERT_STORES, ExpertStore, ExpertStoreKind, TaskVectors, store_from_record

# importing a kind's module registers it; this order is the CLI's
from wemoe.moe.experts.dense import Dense, DenseExperts  # isort: skip
from wemoe.moe.experts.low_rank import LowRank, LowRankExperts  # isort: skip
from wemoe.moe.experts.sign_mask import SignMask, SignMaskExperts  # isort: skip
from wemoe.moe.experts.svd import randomized_truncated_svd, truncated_svd


def store_of_rank(rank: int | None) -> ExpertStoreKind:
    """The built-in store for a rank: whole task vectors (None) or rank-R factors."""
    return Dense() if rank is None else LowRank(LowRank.Options(rank=str(rank)))


__all__ = [
    "EXPERT_STORES",
    "Dense",
    "DenseExperts",
    "ExpertStore",
    "ExpertStoreKind",
    "LowRank",
    "LowRankExperts",
    "SignMask",
    "SignMaskExperts",
    "TaskVectors",
    "store_from_record",
    "store_of_rank",
    "randomized_truncated_svd",
    "truncated_svd",
]
