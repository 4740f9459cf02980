"""The zoo copies its committed fine-tunes only when they were built from the recipe's hash."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.zoo import build, config
from benchmarks.zoo.pretrain import BASE_PATH


def test_committed_finetune_is_copied_only_for_its_hash(tmp_path) -> None:
    committed = tmp_path / "committed"
    committed.mkdir()
    save_file({"w": torch.arange(6.0)}, str(committed / "mnist.safetensors"), metadata={"zoo_hash": "abc", "task": "mnist"})
    out = tmp_path / "cache" / "tasks" / "mnist.safetensors"
    assert not build.copy_committed("mnist", str(out), "other", str(committed))
    assert not out.exists()
    assert not build.copy_committed("letters", str(out), "abc", str(committed))
    assert build.copy_committed("mnist", str(out), "abc", str(committed))
    assert out.read_bytes() == (committed / "mnist.safetensors").read_bytes()


def test_every_committed_finetune_matches_the_current_recipe() -> None:
    """A recipe change without re-committing the models would silently fine-tune again on every machine."""
    rec = config.recipe(False)
    base = config.file_digest(BASE_PATH)
    files = sorted(Path(build.COMMITTED_TASKS).glob("*.safetensors"))
    assert [p.stem for p in files] == sorted(build.datasets.ALL_TASKS)
    for p in files:
        assert build._meta(str(p))["zoo_hash"] == build.hashes(rec, base, p.stem)["ft"], p.name
