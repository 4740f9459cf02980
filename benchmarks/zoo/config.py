"""Build recipe of the zoo (data sizes, head and fine-tuning hyper-parameters) and its hashes.

Every cached artifact records the hash of the recipe parts it depends on, so editing
the recipe (or the base checkpoint) rebuilds exactly what changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from wemoe.checkpoints.inputs import sha256_files

FULL: dict[str, Any] = {
    "seed": 0,
    "data": {"n_train": 3000, "n_test": 600, "version": 1},
    "heads": {"logit_scale": 30.0, "per_class": 100},
    "finetune": {"steps": 400, "batch": 32, "lr": 5e-4, "warmup": 40, "weight_decay": 0.0, "max_shift": 2, "replay_alpha": 1.0, "replay_batch": 8},
    # pretraining-distribution images for the fine-tunes' feature-preserving term (replay.py)
    "replay": {"n": 4000, "seed": 1},
}
QUICK: dict[str, Any] = copy.deepcopy(FULL)
QUICK["data"].update({"n_train": 400, "n_test": 200})
QUICK["heads"].update({"per_class": 20})
QUICK["finetune"].update({"steps": 15, "warmup": 3})


def recipe(quick: bool = False) -> dict[str, Any]:
    return copy.deepcopy(QUICK if quick else FULL)


def digest(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts (dict key order ignored)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str) -> str:
    """Short sha256 of a file's bytes (wemoe's own digest, as recorded in merge outputs)."""
    return sha256_files([Path(path)])[:16]
