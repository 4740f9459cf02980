"""The learned routers, trained by adaptation from coefficients ``init_lambda``.

* ``mlp`` (the paper's): ``Linear(D, D) -> ReLU -> Linear(D, T)`` per token, averaged;
  raw outputs are the coefficients (no softmax);
* ``linear``: ``Linear(D, T)`` on the token mean;
* ``constant``: a learnable vector of ``T`` coefficients (= layer-wise AdaMerging).

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

import torch
from torch import nn

from wemoe.errors import WemoeError
from wemoe.moe.routers.base import ROUTERS, RouterKind

INIT_STD = 0.01


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


class _Learned(RouterKind):
    def build(self, width: int, num_experts: int, init_lambda: float) -> nn.Module:
        return Router(width, num_experts, self.layers, init_lambda, INIT_STD)

    def record(self) -> dict:
        return {}


@ROUTERS.register
class MlpRouter(_Learned):
    name = "mlp"
    summary = "the paper's: Linear(D, D) -> ReLU -> Linear(D, T) per token, averaged"
    layers = 2


@ROUTERS.register
class LinearRouter(_Learned):
    name = "linear"
    summary = "Linear(D, T) on the token mean"
    layers = 1


@ROUTERS.register
class ConstantRouter(_Learned):
    name = "constant"
    summary = "T learnable coefficients per routed group (layer-wise AdaMerging)"
    layers = 0


__all__ = ["INIT_STD", "ConstantRouter", "LinearRouter", "MlpRouter", "Router"]
