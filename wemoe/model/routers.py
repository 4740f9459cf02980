"""Routers: a routed group's input tokens (B, N, D) -> one coefficient vector per sample (B, T).

A small registry of kinds (``--router``):

* ``mlp`` (the paper's): ``Linear(D, D) -> ReLU -> Linear(D, T)`` per token, averaged;
  raw outputs are the coefficients (no softmax);
* ``linear``: ``Linear(D, T)`` on the token mean;
* ``constant``: a learnable vector of ``T`` coefficients (= layer-wise AdaMerging);
* ``prototype``: softmax of the cosine similarity between the sample's token mean
  and one prototype per task (the mean router input of that task's adaptation
  images; see ``wemoe.fit_routers``), in the spirit of mixture-of-introvert-experts;
* ``subspace`` (SMILE, Tang et al. 2024): softmax of the norm of the tokens'
  projection onto the top right singular vectors of each task vector, averaged over
  tokens; needs no data.

The two training-free kinds can be followed by adaptation (prototypes and gate
vectors are parameters), ``top_k`` keeps the k largest weights (renormalised).

The learned kinds (``Router``):

Init: weights ~ N(0, init_std), hidden bias 0, output bias = ``init_lambda``,
so at init every sample gets coefficients close to ``init_lambda``.

Implementation note: because the last layer is affine, the token mean is taken
*before* it (``mean_n(W h_n + b) == W mean_n(h_n) + b``), which is exact up to
float rounding and saves a (B, N, T) intermediate. For ``layers=1`` the mean is
therefore taken over the raw input tokens.

The router computes in the dtype of its own parameters (the input is cast);
the output has that dtype too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wemoe.errors import WemoeError


class Router(nn.Module):
    """The learned routers: ``layers`` 2 (mlp), 1 (linear), 0 (constant)."""

    def __init__(
        self,
        width: int,
        num_experts: int,
        layers: int = 2,
        init_lambda: float = 0.3,
        init_std: float = 0.01,
    ):
        super().__init__()
        if layers not in (0, 1, 2):
            raise WemoeError(f"router layers must be 0, 1 or 2, got {layers}")
        if width <= 0 or num_experts <= 0:
            raise WemoeError(f"router needs positive width and expert count, got {width}, {num_experts}")
        self.width = int(width)
        self.num_experts = int(num_experts)
        self.layers = int(layers)
        self.init_lambda = float(init_lambda)
        self.init_std = float(init_std)
        if layers == 0:
            self.coefficients = nn.Parameter(torch.full((num_experts,), float(init_lambda)))
        elif layers == 1:
            self.out = nn.Linear(width, num_experts)
        else:
            self.hidden = nn.Linear(width, width)
            self.out = nn.Linear(width, num_experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.layers == 0:
                self.coefficients.fill_(self.init_lambda)
                return
            if self.layers == 2:
                nn.init.normal_(self.hidden.weight, mean=0.0, std=self.init_std)
                nn.init.zeros_(self.hidden.bias)
            nn.init.normal_(self.out.weight, mean=0.0, std=self.init_std)
            nn.init.constant_(self.out.bias, self.init_lambda)

    def materialize(self, device: torch.device | str = "cpu") -> None:
        """Real, initialised weights for a router built on the meta device.

        Draws exactly what building the router on ``device`` draws (each Linear's
        default init, then this router's), so the random stream, and hence the
        routers of a seeded merge, do not depend on how the model was built.
        """
        self.to_empty(device=device)
        for layer in (getattr(self, "hidden", None), getattr(self, "out", None)):
            if layer is not None:
                layer.reset_parameters()
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise WemoeError(f"router expects input (B, N, {self.width}), got {tuple(x.shape)}")
        if self.layers == 0:
            return self.coefficients.unsqueeze(0).expand(x.shape[0], -1)
        dtype = self.out.weight.dtype
        x = x.to(dtype)
        if self.layers == 1:
            return self.out(x.mean(dim=1))
        h = torch.relu(self.hidden(x))
        return self.out(h.mean(dim=1))

    def extra_repr(self) -> str:
        return f"width={self.width}, num_experts={self.num_experts}, layers={self.layers}"


def _top_k(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest weights of each row, renormalised (k <= 0 or >= T: all)."""
    if k <= 0 or k >= weights.shape[-1]:
        return weights
    kept = weights.topk(k, dim=-1).indices
    mask = torch.zeros_like(weights).scatter_(-1, kept, 1.0)
    masked = weights * mask
    return masked / masked.sum(-1, keepdim=True)


class PrototypeRouter(nn.Module):
    """softmax_t(cos(mean_n h_n, p_t) / temperature), top-k; ``prototypes`` (T, D) are fitted from data."""

    def __init__(self, width: int, num_experts: int, temperature: float = 0.05, top_k: int = 0):
        super().__init__()
        self.width, self.num_experts = int(width), int(num_experts)
        self.temperature, self.top_k = float(temperature), int(top_k)
        self.prototypes = nn.Parameter(torch.zeros(num_experts, width))

    def materialize(self, device: torch.device | str = "cpu") -> None:
        self.to_empty(device=device)
        with torch.no_grad():
            self.prototypes.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.to(self.prototypes.dtype).mean(dim=1)
        sim = F.normalize(m, dim=-1) @ F.normalize(self.prototypes, dim=-1).t()
        return _top_k(torch.softmax(sim / self.temperature, dim=-1), self.top_k)

    def extra_repr(self) -> str:
        return f"width={self.width}, num_experts={self.num_experts}, temperature={self.temperature}, top_k={self.top_k}"


class SubspaceRouter(nn.Module):
    """SMILE routing: softmax_t(mean_n ||G_t h_n|| / temperature), top-k; ``gates`` (T, k, D) are
    the top-k right singular vectors of each task vector of the group's first linear."""

    def __init__(self, width: int, num_experts: int, gate_rank: int = 16, temperature: float = 1.0, top_k: int = 0):
        super().__init__()
        self.width, self.num_experts, self.gate_rank = int(width), int(num_experts), int(gate_rank)
        self.temperature, self.top_k = float(temperature), int(top_k)
        self.gates = nn.Parameter(torch.zeros(num_experts, gate_rank, width))

    def materialize(self, device: torch.device | str = "cpu") -> None:
        self.to_empty(device=device)
        with torch.no_grad():
            self.gates.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, k = self.num_experts, self.gate_rank
        proj = F.linear(x.to(self.gates.dtype), self.gates.reshape(T * k, self.width))  # (B, N, T*k)
        norms = proj.unflatten(-1, (T, k)).norm(dim=-1).mean(dim=1)  # (B, T)
        return _top_k(torch.softmax(norms / self.temperature, dim=-1), self.top_k)

    def extra_repr(self) -> str:
        return f"width={self.width}, num_experts={self.num_experts}, gate_rank={self.gate_rank}, temperature={self.temperature}, top_k={self.top_k}"


ROUTER_KINDS = ("mlp", "linear", "constant", "prototype", "subspace")
LEARNED_LAYERS = {"mlp": 2, "linear": 1, "constant": 0}
TRAINING_FREE = ("prototype", "subspace")


@dataclass(frozen=True)
class RouterSpec:
    """Which router every routed group gets, and its options."""

    kind: str = "mlp"
    temperature: float | None = None  # None: the kind's default (prototype 0.05, subspace 1.0)
    top_k: int = 0  # 0: keep every expert
    gate_rank: int = 16

    def build(self, width: int, num_experts: int, init_lambda: float) -> nn.Module:
        if self.kind in LEARNED_LAYERS:
            return Router(width, num_experts, LEARNED_LAYERS[self.kind], init_lambda)
        if self.kind == "prototype":
            return PrototypeRouter(width, num_experts, 0.05 if self.temperature is None else self.temperature, self.top_k)
        if self.kind == "subspace":
            return SubspaceRouter(width, num_experts, self.gate_rank, 1.0 if self.temperature is None else self.temperature, self.top_k)
        raise WemoeError(f"unknown router '{self.kind}' (known: {', '.join(ROUTER_KINDS)})")
