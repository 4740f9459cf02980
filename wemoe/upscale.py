"""Build a WEMoE model from a base and task checkpoints (no training yet).

Non-routed tensors: task arithmetic theta_0 + lambda * sum_i tau_i. Each routed
linear: the PRETRAINED weight and bias as base, the task vectors of both as frozen
experts, whole or as rank-R truncated SVD factors. With routers at their initial
output bias lambda and zero weights the model equals the task-arithmetic merge
(for dense experts).
"""

from __future__ import annotations

import re

import torch
from tqdm import tqdm

from wemoe.merging.inputs import MergeInputs
from wemoe.merging.static import task_arithmetic
from wemoe.model.experts import truncated_svd
from wemoe.model.moe import GROUP_LINEARS
from wemoe.model.wemoe_model import MoESpec, WEMoEModel
from wemoe.task_vectors import base_tensor, iter_task_vectors, stacked_task_vectors


def routed_keys(spec: MoESpec) -> dict[str, str]:
    """Canonical weight/bias keys of every routed linear -> that linear's module path."""
    out = {}
    for b, g in spec.routes():
        for name in GROUP_LINEARS[g]:
            path = f"blocks.{b}.{g}.{name}"
            out[f"{path}.weight"] = path
            out[f"{path}.bias"] = path
    return out


def build_wemoe(inputs: MergeInputs, spec: MoESpec, seed: int = 0, progress: bool = True) -> tuple[WEMoEModel, dict[str, list[float]]]:
    """The model, and for low-rank experts the fraction of each task vector's energy kept
    (``{linear path: [per task]}``; empty for dense experts)."""
    arch = inputs.base.arch
    routed = routed_keys(spec)
    state: dict[str, torch.Tensor] = {}
    energy: dict[str, list[float]] = {}
    for key in tqdm(inputs.base.keys(), desc="upscaling", unit="tensor", disable=not progress, leave=False):
        base = base_tensor(inputs, key)
        if not base.is_floating_point():
            state[key] = base
        elif key not in routed:
            state[key] = task_arithmetic(base, iter_task_vectors(inputs, key, base), spec.init_lambda).float()
        elif key.endswith(".bias"):
            state[key] = base.float()
            state[f"{routed[key]}.experts.bias"] = stacked_task_vectors(inputs, key, base).float()
        else:
            state[key] = base.float()
            state.update(_expert_weights(inputs, key, base, routed[key], spec.rank, energy))
    # on the meta device: every tensor is then assigned from ``state`` (no second copy)
    with torch.device("meta"):
        model = WEMoEModel(arch, inputs.task_names, spec, head_bias="head.bias" in state)
    model.init_routers(seed)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected, unexpected
    not_loaded = [k for k in missing if not re.match(r"blocks\.\d+\.routers\.", k)]
    assert not not_loaded, not_loaded
    return model.freeze_backbone().eval(), energy


def _expert_weights(inputs: MergeInputs, key: str, base: torch.Tensor, path: str, rank: int | None, energy: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    out_features, in_features = base.shape
    if rank is None:
        if out_features >= in_features:
            return {f"{path}.experts.weight": stacked_task_vectors(inputs, key, base).float()}
        # contracting layers keep the stack transposed: build it that way, saving a copy
        stack = stacked_task_vectors(inputs, key, base, transposed=True)
        return {f"{path}.experts.weight_t": stack.transpose(1, 2).float()}
    downs, ups, kept = [], [], []
    for tau in iter_task_vectors(inputs, key, base):
        down, up, fraction = truncated_svd(tau.float(), rank)
        downs.append(down)
        ups.append(up)
        kept.append(round(fraction, 6))
    energy[path] = kept
    return {f"{path}.experts.down": torch.stack(downs), f"{path}.experts.up": torch.stack(ups)}
