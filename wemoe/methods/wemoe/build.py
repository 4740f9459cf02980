"""Build a WEMoE model from a base and task checkpoints (no training yet).

Non-routed tensors: task arithmetic theta_0 + lambda * sum_i tau_i. Each routed
linear: the PRETRAINED weight and bias as base, the task vectors of both as frozen
experts, kept by the spec's expert store (whole, or rank-R truncated SVD factors,
``wemoe.moe.experts``). With routers at their initial
output bias lambda and zero weights the model equals the task-arithmetic merge
(for dense experts).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from tqdm import tqdm

from wemoe.checkpoints.inputs import MergeInputs
from wemoe.checkpoints.task_vectors import TaskVectorsOf, base_tensor, iter_task_vectors, stacked_task_vectors
from wemoe.methods.arithmetic import task_arithmetic
from wemoe.moe.block import GROUP_LINEARS
from wemoe.moe.model import WEMoEModel
from wemoe.moe.spec import MoESpec


def routed_keys(spec: MoESpec) -> dict[str, str]:
    """Canonical weight/bias keys of every routed linear -> that linear's module path."""
    out = {}
    for b, g in spec.routes():
        for name in GROUP_LINEARS[g]:
            path = f"blocks.{b}.{g}.{name}"
            out[f"{path}.weight"] = path
            out[f"{path}.bias"] = path
    return out


def whole_expert_keys(spec: MoESpec, keys: list[str]) -> dict[str, str]:
    """``--experts all``: canonical key of every other routed tensor -> where its task vectors go (whole).

    Norms of the MoE blocks, the stem (patch embedding, class and position embeddings, pre-norm),
    the final norm and the projection.
    """
    if not spec.rest:
        return {}
    norms = tuple(f"blocks.{b}.{n}." for b in spec.blocks for n in ("norm1", "norm2"))
    out = {}
    for key in keys:
        if key in ("cls_token", "pos_embed"):
            out[key] = f"embed_experts.{key}"
        elif key.startswith(("patch_embed.proj.", "norm_pre.", "norm.", "head.", *norms)):
            path, name = key.rsplit(".", 1)
            out[key] = f"{path}.experts.{name}"
    return out


SMALL_MATRICES = ("patch_embed.proj", "head")  # the matrices --small-experts compressed keeps in the store


class FlatTaskVectors:
    """Task vectors of a tensor offered as (out, in) matrices: the patch embedding's (D, 3, p, p) as (D, 3 * p * p)."""

    def __init__(self, vectors: TaskVectorsOf, out_features: int):
        self.vectors, self.out_features = vectors, out_features

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (tau.reshape(self.out_features, -1) for tau in self.vectors)

    def stack(self, transposed: bool = False) -> torch.Tensor:
        stacked = self.vectors.stack()
        flat = stacked.reshape(stacked.shape[0], self.out_features, -1)
        return flat if not transposed else flat.transpose(1, 2).contiguous().transpose(1, 2)

    def factors(self) -> list[None]:
        return [None for _ in self.vectors.inputs.tasks]  # adapters carry no factors of these (their matrices are whole)


def build_wemoe(inputs: MergeInputs, spec: MoESpec, seed: int = 0, progress: bool = True) -> tuple[WEMoEModel, dict[str, list[float]]]:
    """The model, and what the expert store keeps of each routed weight's task vectors, by linear path
    (low-rank experts: the fraction of each task vector's energy kept; empty for dense experts)."""
    arch = inputs.base.arch
    routed = routed_keys(spec)
    small = {f"{path}.weight": path for path in SMALL_MATRICES} if spec.small_store is not None else {}
    whole = whole_expert_keys(spec, inputs.base.keys())
    state: dict[str, torch.Tensor] = {}
    energy: dict[str, list[float]] = {}
    for key in tqdm(inputs.base.keys(), desc="upscaling", unit="tensor", disable=not progress, leave=False):
        base = base_tensor(inputs, key)
        if not base.is_floating_point():
            state[key] = base
        elif key in small:  # the patch embedding's or projection's weight, kept by the store (--small-experts compressed)
            state[key] = base.float()
            out_features = base.shape[0]
            buffers, kept = spec.store.weight_buffers(FlatTaskVectors(TaskVectorsOf(inputs, key, base), out_features), out_features, base[0].numel())
            state.update({f"{small[key]}.experts.{name}": tensor for name, tensor in buffers.items()})
            if kept is not None:
                energy[small[key]] = kept
        elif key in whole:  # kept as the pretrained tensor plus whole task vectors
            state[key] = base.float()
            state[whole[key]] = stacked_task_vectors(inputs, key, base).float()
        elif key not in routed:
            state[key] = task_arithmetic(base, iter_task_vectors(inputs, key, base), spec.init_lambda).float()
        elif key.endswith(".bias"):
            state[key] = base.float()
            state[f"{routed[key]}.experts.bias"] = stacked_task_vectors(inputs, key, base).float()
        else:
            state[key] = base.float()
            buffers, kept = spec.store.weight_buffers(TaskVectorsOf(inputs, key, base), *base.shape)
            state.update({f"{routed[key]}.experts.{name}": tensor for name, tensor in buffers.items()})
            if kept is not None:
                energy[routed[key]] = kept
    for path in small.values():  # a bias-less patch embedding or projection: its store's expert biases are zero
        if f"{path}.weight" in state and f"{path}.experts.bias" not in state:
            state[f"{path}.experts.bias"] = torch.zeros(len(inputs.task_names), state[f"{path}.weight"].shape[0])
    # on the meta device: every tensor is then assigned from ``state`` (no second copy)
    with torch.device("meta"):
        model = WEMoEModel(arch, inputs.task_names, spec, head_bias="head.bias" in state)
    model.init_routers(seed)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected, unexpected
    not_loaded = [k for k in missing if not re.match(r"blocks\.\d+\.routers\.|task_router\.|unseen\.", k)]  # routers are made, not merged
    assert not not_loaded, not_loaded
    return model.freeze_backbone().eval(), energy


__all__ = ["build_wemoe", "routed_keys", "whole_expert_keys"]
