"""Training-free routers: prototypes from task data, subspace gates from the task vectors.

``prototype`` routers: for every routed group, the mean token-averaged router input
of each task's adaptation images. The router inputs of a block depend on how the
earlier blocks routed; the prototypes are taken with every image routed to its own
task's expert (one forward pass per task, no gradients), i.e. what a group's input
looks like when the routing before it was right - the state a correct router keeps
the model in.

``subspace`` routers (SMILE): the top right singular vectors of each task vector of
the group's first linear (fc1 for the MLP, qkv for attention), the layer that reads
the group input. No data.
"""

from __future__ import annotations

import numpy as np
import torch

from wemoe.data import TaskData, preprocess
from wemoe.errors import WemoeError
from wemoe.model.experts import LowRankExperts
from wemoe.model.moe import GROUP_LINEARS
from wemoe.model.routers import PrototypeRouter, SubspaceRouter
from wemoe.model.vit import RoutingTrace
from wemoe.model.wemoe_model import WEMoEModel


@torch.no_grad()
def task_prototypes(
    model: WEMoEModel, data: dict[str, TaskData], images: int = 256, seed: int = 0, device: str = "cpu", batch_size: int = 64
) -> dict[str, list[torch.Tensor]]:
    """``{task: [mean router input (D,) per routing entry]}`` with each task routed to its own expert."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[torch.Tensor]] = {}
    for task, d in data.items():
        idx = np.sort(rng.choice(len(d), size=min(images, len(d)), replace=False))
        onehot = torch.zeros(len(model.task_names))
        onehot[model.task_names.index(task)] = 1.0
        sums: list[torch.Tensor] | None = None
        with model.fixed_routing(onehot):
            for start in range(0, len(idx), batch_size):
                trace = RoutingTrace(keep_inputs=True)
                model.encode(preprocess(d.take(idx[start : start + batch_size]), model.arch, device), trace)
                batch = [m.float().sum(0) for m in trace.inputs]
                sums = batch if sums is None else [a + b for a, b in zip(sums, batch)]
        out[task] = [s / len(idx) for s in sums]
    return out


def fit_routers(model: WEMoEModel, data: dict[str, TaskData] | None = None, images: int = 256, seed: int = 0, device: str = "cpu") -> None:
    """Set the parameters of every prototype or subspace router of ``model`` (other kinds are left as they are)."""
    kind = model.spec.router.kind
    if kind == "prototype":
        missing = [t for t in model.task_names if not data or t not in data]
        if missing:
            raise WemoeError(f"--router prototype needs --data for every task (missing: {', '.join(missing)})")
        protos = task_prototypes(model, data, images, seed, device)  # type: ignore[arg-type]
        for k, router in enumerate(model.routers()):
            assert isinstance(router, PrototypeRouter)
            with torch.no_grad():
                router.prototypes.copy_(torch.stack([protos[t][k] for t in model.task_names]))
    elif kind == "subspace":
        for (b, group), router in zip(model.spec.routes(), model.routers()):
            assert isinstance(router, SubspaceRouter)
            first = model.blocks[b].routed_linears(group)[GROUP_LINEARS[group][0]]
            with torch.no_grad():
                router.gates.copy_(gate_vectors(first.experts, router.gate_rank))


def gate_vectors(experts, k: int) -> torch.Tensor:
    """(T, k, in): the top-k right singular vectors of each task vector of a linear layer."""
    if isinstance(experts, LowRankExperts) and experts.rank >= k:
        return experts.down[:, :k].float()  # the truncated SVD already holds them, in order
    dw, _ = experts.task_vectors()
    if k > min(dw.shape[1:]):
        raise WemoeError(f"--gate-rank {k} is above the smaller side ({min(dw.shape[1:])}) of the routed matrices")
    return torch.stack([torch.linalg.svd(t.double(), full_matrices=False)[2][:k] for t in dw]).float()
