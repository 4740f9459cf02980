"""The merged WEMoE model: a ViT whose chosen blocks are MoE blocks, plus the task heads.

Everything that is not routed holds task-arithmetic weights
theta_0 + lambda * sum_i tau_i; each routed linear holds the pretrained weight,
the task vectors (frozen; dense or low-rank) and is driven by its block's router
for that group (the routers are the only trainable part).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from wemoe.arch import ViTArch
from wemoe.errors import WemoeError
from wemoe.model.moe import DEFAULT_COEF_GUARD, GROUPS, MoEBlock
from wemoe.model.routers import LEARNED_LAYERS, RouterSpec
from wemoe.model.vit import Block, RoutingTrace, VisionTransformer


def parse_moe_blocks(spec: str | Sequence[int] | None, depth: int) -> list[int]:
    """``all`` | ``last:N`` | ``first:N`` | ``0,3,5`` -> sorted block indices."""
    if spec is None or spec == "all":
        return list(range(depth))
    if not isinstance(spec, str):
        blocks = sorted(set(int(b) for b in spec))
    else:
        s = spec.strip()
        try:
            if s.startswith("last:"):
                n = int(s[5:])
                blocks = list(range(max(0, depth - n), depth)) if n > 0 else []
            elif s.startswith("first:"):
                n = int(s[6:])
                blocks = list(range(min(n, depth))) if n > 0 else []
            else:
                blocks = sorted(set(int(p) for p in s.split(",") if p.strip()))
        except ValueError:
            raise WemoeError(f"invalid --moe-blocks '{spec}' (use all, last:N, first:N or 0,3,5)") from None
    if not blocks:
        raise WemoeError(f"--moe-blocks '{spec}' selects no block")
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise WemoeError(f"--moe-blocks names block(s) {bad}; the model has blocks 0..{depth - 1}")
    return blocks


def parse_groups(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``mlp`` | ``attn`` | ``mlp,attn`` -> the routed groups in block order."""
    names = [g.strip() for g in (spec.split(",") if isinstance(spec, str) else spec) if g.strip()]
    unknown = [g for g in names if g not in GROUPS]
    if unknown or not names:
        raise WemoeError(f"--experts must name one or more of {', '.join(GROUPS)} (e.g. mlp,attn), got '{spec}'")
    return tuple(g for g in GROUPS if g in names)


@dataclass(frozen=True)
class MoESpec:
    """What a WEMoE model routes, and how: everything needed to rebuild its module."""

    blocks: tuple[int, ...]
    groups: tuple[str, ...] = ("mlp",)
    rank: int | None = None  # None: dense task vectors
    router: RouterSpec = RouterSpec()
    init_lambda: float = 0.3  # task-arithmetic scale of the non-routed weights; learned routers' initial output
    coef_range: tuple[float, float] | None = None
    coef_guard: str = DEFAULT_COEF_GUARD  # how coef_range is enforced: see wemoe.model.moe.COEF_GUARDS

    def routes(self) -> list[tuple[int, str]]:
        """(block, group) of every routing entry, in the order ``model.routing`` returns them."""
        return [(b, g) for b in self.blocks for g in self.groups]

    def to_record(self) -> dict:
        """The ``wemoe`` section fields of config.json that rebuild the module."""
        r = self.router
        return {
            "lambda": self.init_lambda,
            "moe_blocks": list(self.blocks),
            "groups": list(self.groups),
            "rank": self.rank,
            "router": r.kind,
            "router_options": {"temperature": r.temperature, "top_k": r.top_k, "gate_rank": r.gate_rank},
            "router_layers": LEARNED_LAYERS.get(r.kind),
            "router_init_std": 0.01,
            "coef_range": list(self.coef_range) if self.coef_range else None,
            "coef_guard": self.coef_guard,
            "routing_order": [f"{b}.{g}" for b, g in self.routes()],
        }

    @classmethod
    def from_record(cls, moe: dict) -> MoESpec:
        """Inverse of ``to_record``; records of format 1 (MLP-only, ``router_layers`` only) too."""
        kind = moe.get("router") or {2: "mlp", 1: "linear", 0: "constant"}[int(moe["router_layers"])]
        options = moe.get("router_options") or {}
        router = RouterSpec(kind, options.get("temperature"), int(options.get("top_k", 0)), int(options.get("gate_rank", 16)))
        coef_range = (float(moe["coef_range"][0]), float(moe["coef_range"][1])) if moe.get("coef_range") else None
        return cls(
            blocks=tuple(moe["moe_blocks"]),
            groups=tuple(moe.get("groups", ("mlp",))),
            rank=moe.get("rank"),
            router=router,
            init_lambda=float(moe["lambda"]),
            coef_range=coef_range,
            coef_guard=moe.get("coef_guard", "clamp"),  # unrecorded: written when clamp was the only guard
        )


class WEMoEModel(VisionTransformer):
    """``model(images)`` -> image embedding; ``model.logits(images, task)``; ``model.routing(images)``."""

    def __init__(self, arch: ViTArch, task_names: Sequence[str], spec: MoESpec, head_bias: bool = False):
        T = len(task_names)

        def block_fn(a: ViTArch, index: int) -> Block:
            if index not in spec.blocks:
                return Block(a)
            routers = {g: spec.router.build(a.width, T, spec.init_lambda) for g in spec.groups}
            return MoEBlock(a, T, spec.groups, spec.rank, routers, spec.coef_range, spec.coef_guard)

        super().__init__(arch, head_bias=head_bias, block_fn=block_fn)
        self.task_names = list(task_names)
        self.spec = spec

    @property
    def moe_blocks(self) -> list[int]:
        return list(self.spec.blocks)

    def moe_block_modules(self) -> list[MoEBlock]:
        return [self.blocks[b] for b in self.spec.blocks]  # type: ignore[misc]

    def routers(self) -> list[nn.Module]:
        """Every router, in routing order."""
        return [self.blocks[b].routers[g] for b, g in self.spec.routes()]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for r in self.routers() for p in r.parameters()]

    def init_routers(self, seed: int, device: torch.device | str = "cpu") -> None:
        """Give every router (built on the meta device) real, seeded initial weights, in routing order."""
        torch.manual_seed(seed)
        for r in self.routers():
            r.materialize(device)

    def freeze_backbone(self) -> WEMoEModel:
        """Only routers train in WEMoE: everything else is frozen."""
        router = {id(p) for p in self.router_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in router)
        return self

    def routing(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Routing coefficients, one (B, T) tensor per routed group: blocks in order, in each block
        attention before MLP (``spec.routes()`` names them); experts in task order."""
        trace = RoutingTrace()
        self.encode(images, trace)
        return trace.routes

    def route_labels(self) -> list[str]:
        """A short label per routing entry ("5" for MLP-only models, else "5.attn", "5.mlp")."""
        if self.spec.groups == ("mlp",):
            return [str(b) for b, _ in self.spec.routes()]
        return [f"{b}.{g}" for b, g in self.spec.routes()]

    @contextmanager
    def fixed_routing(self, coefs: Sequence[float] | torch.Tensor) -> Iterator[WEMoEModel]:
        """Route every sample of every group with the same (T,) coefficients while inside the block.

        A diagnostic, not a way to deploy: e.g. one-hot on a task's own expert gives
        the accuracy a perfect router could reach with the merged non-routed weights.
        """
        c = torch.as_tensor(coefs, dtype=torch.float32).reshape(-1)
        if c.numel() != len(self.task_names):
            raise WemoeError(f"fixed routing needs {len(self.task_names)} coefficients, got {c.numel()}")
        blocks = self.moe_block_modules()
        for m in blocks:
            m.fixed_routing = c.to(m.norm1.weight.device)
        try:
            yield self
        finally:
            for m in blocks:
                m.fixed_routing = None


def parameter_count(arch: ViTArch, num_tasks: int, spec: MoESpec | None) -> int:
    """Numbers a merged model holds (parameters and buffers; routers included), counted on the meta device.

    ``spec`` None: a plain ViT of ``arch``."""
    with torch.device("meta"):
        model = VisionTransformer(arch) if spec is None else WEMoEModel(arch, [f"t{i}" for i in range(num_tasks)], spec)
    return sum(t.numel() for t in model.state_dict().values())
