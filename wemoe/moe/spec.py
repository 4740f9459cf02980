"""What a WEMoE model routes and how: the blocks, the routed groups, the expert store, the router kind.

One frozen value that builds the module (``WEMoEModel``) and is written to and read
back from the record's ``wemoe`` section.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from wemoe.errors import WemoeError
from wemoe.moe.block import DEFAULT_COEF_GUARD, GROUPS
from wemoe.moe.experts import Dense, ExpertStoreKind, store_from_record
from wemoe.moe.routers import ROUTERS, MlpRouter, RouterKind
from wemoe.moe.routers.learned import INIT_STD
from wemoe.moe.unseen import DEFAULT_COMPONENTS


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


SMALL_EXPERTS = ("whole", "compressed")  # --small-experts
ALL = "all"  # --experts all: attention, MLP and every other weight (norms, embeddings, projection)


def parse_groups(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``mlp`` | ``attn`` | ``mlp,attn`` | ``all`` -> the routed groups in block order (``all``: both)."""
    names = [g.strip() for g in (spec.split(",") if isinstance(spec, str) else spec) if g.strip()]
    if names == [ALL]:
        return GROUPS
    unknown = [g for g in names if g not in GROUPS]
    if unknown or not names:
        raise WemoeError(f"--experts must be all, or name one or more of {', '.join(GROUPS)} (e.g. mlp,attn), got '{spec}'")
    return tuple(g for g in GROUPS if g in names)


def routes_rest(spec: str | Sequence[str]) -> bool:
    """Whether ``--experts`` routes the rest too (norms, embeddings, projection)."""
    return [g.strip() for g in (spec.split(",") if isinstance(spec, str) else spec) if g.strip()] == [ALL]


@dataclass(frozen=True)
class MoESpec:
    """What a WEMoE model routes, and how: everything needed to rebuild its module."""

    blocks: tuple[int, ...]
    groups: tuple[str, ...] = ("mlp",)
    store: ExpertStoreKind = field(default_factory=Dense)  # how routed task vectors are kept
    router: RouterKind = field(default_factory=MlpRouter)
    init_lambda: float = 0.3  # task-arithmetic scale of the non-routed weights; learned routers' initial output
    coef_range: tuple[float, float] | None = None
    coef_guard: str = DEFAULT_COEF_GUARD  # how coef_range is enforced: see wemoe.moe.block.COEF_GUARDS
    rest: bool = False  # norms, embeddings and the projection routed too (--experts all); needs a shared router
    unseen: str = "route"  # images of no merged task: routed anyway, or served with base / task-arithmetic coefficients
    unseen_components: int = DEFAULT_COMPONENTS  # principal directions per task of the unseen-image detector
    small_experts: str = "whole"  # with rest: the patch embedding's and projection's task vectors whole, or "compressed" by the store

    @property
    def small_store(self) -> ExpertStoreKind | None:
        """The store that keeps the patch embedding's and projection's task vectors (None: whole)."""
        return self.store if self.rest and self.small_experts == "compressed" else None

    def describe_routed(self) -> str:
        small = " (patch embedding and projection compressed)" if self.small_store is not None else ""
        return ",".join(self.groups) + (f" + norms, embeddings, projection{small}" if self.rest else "")

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
            **self.store.record(),
            "router": r.name,
            "router_options": r.record(),
            "router_layers": r.layers,
            "router_init_std": INIT_STD,
            "coef_range": list(self.coef_range) if self.coef_range else None,
            "coef_guard": self.coef_guard,
            "routing_order": [f"{b}.{g}" for b, g in self.routes()],
            **({"rest": True} if self.rest else {}),
            **({"small_experts": self.small_experts} if self.small_experts != "whole" else {}),
            **({"unseen": self.unseen, "unseen_components": self.unseen_components} if self.unseen != "route" else {}),
        }

    @classmethod
    def from_record(cls, moe: dict) -> MoESpec:
        """Inverse of ``to_record``; records of format 1 (MLP-only, ``router_layers`` only) too."""
        kind = moe.get("router") or {2: "mlp", 1: "linear", 0: "constant"}[int(moe["router_layers"])]
        coef_range = (float(moe["coef_range"][0]), float(moe["coef_range"][1])) if moe.get("coef_range") else None
        return cls(
            blocks=tuple(moe["moe_blocks"]),
            groups=tuple(moe.get("groups", ("mlp",))),
            store=store_from_record(moe),
            router=ROUTERS.from_record(str(kind), moe.get("router_options")),
            init_lambda=float(moe["lambda"]),
            coef_range=coef_range,
            coef_guard=moe.get("coef_guard", "clamp"),  # unrecorded: written when clamp was the only guard
            rest=bool(moe.get("rest", False)),
            unseen=str(moe.get("unseen", "route")),
            unseen_components=int(moe.get("unseen_components", DEFAULT_COMPONENTS)),
            small_experts=str(moe.get("small_experts", "whole")),
        )


__all__ = ["ALL", "SMALL_EXPERTS", "MoESpec", "parse_groups", "parse_moe_blocks", "routes_rest"]
