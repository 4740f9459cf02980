"""Build a WEMoE model from a base and task checkpoints (no training yet).

Non-MoE tensors: task arithmetic theta_0 + lambda * sum_i tau_i. Each chosen
block's MLP: the PRETRAINED MLP as base and the MLP task vectors as frozen
experts. With routers at their initial output bias lambda and zero weights the
model equals the task-arithmetic merge.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from wemoe.merge.inputs import MergeInputs
from wemoe.merge.static import task_arithmetic
from wemoe.model.moe import WeightEnsemblingMLP
from wemoe.model.wemoe_model import WEMoEModel
from wemoe.schemes import MLP_SUFFIXES
from wemoe.task_vectors import base_tensor, iter_task_vectors, stacked_task_vectors


def build_wemoe(
    inputs: MergeInputs,
    lam: float = 0.3,
    moe_blocks: list[int] | None = None,
    router_layers: int = 2,
    coef_range: tuple[float, float] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> WEMoEModel:
    arch = inputs.base.arch
    blocks = list(range(arch.depth)) if moe_blocks is None else moe_blocks
    moe_keys = {f"blocks.{b}.{s}": (b, s) for b in blocks for s in MLP_SUFFIXES}
    state: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {b: {} for b in blocks}
    for key in tqdm(inputs.base.keys(), desc="upscaling", unit="tensor", disable=not progress, leave=False):
        base = base_tensor(inputs, key)
        if not base.is_floating_point():
            state[key] = base
            continue
        if key in moe_keys:
            b, suffix = moe_keys[key]
            # the MoE block keeps fc2 experts transposed: build them that way, saving a copy
            stack = stacked_task_vectors(inputs, key, base, transposed=suffix == "mlp.fc2.weight")
            experts[b][suffix] = (base.float(), stack.float())
        else:
            state[key] = task_arithmetic(base, iter_task_vectors(inputs, key, base), lam).float()
    torch.manual_seed(seed)
    # on the meta device: every non-MoE tensor is then assigned from ``state`` (no second copy)
    with torch.device("meta"):
        model = WEMoEModel(arch, inputs.task_names, blocks, router_layers, lam, coef_range, head_bias="head.bias" in state)
    for b in blocks:
        e = experts.pop(b)  # handed over without a copy, then dropped: peak stays near the output size
        model.blocks[b].mlp = WeightEnsemblingMLP(
            e["mlp.fc1.weight"][0], e["mlp.fc1.bias"][0], e["mlp.fc2.weight"][0], e["mlp.fc2.bias"][0],
            e["mlp.fc1.weight"][1], e["mlp.fc1.bias"][1], e["mlp.fc2.weight"][1], e["mlp.fc2.bias"][1],
            activation=arch.activation, router_layers=router_layers, init_lambda=lam, coef_range=coef_range, copy=False,
        )
        del e
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected, unexpected
    not_loaded = [k for k in missing if ".mlp." not in k]
    assert not not_loaded, not_loaded
    return model.freeze_backbone().eval()
