"""The merged WEMoE model: a ViT whose chosen blocks are MoE blocks, plus the task heads.

Everything that is not routed holds task-arithmetic weights
theta_0 + lambda * sum_i tau_i; each routed linear holds the pretrained weight,
the task vectors (frozen; kept by the spec's expert store) and is driven by its
block's router for that group (the routers are the only trainable part).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from wemoe.core.arch import ViTArch
from wemoe.errors import WemoeError
from wemoe.model.vit import Block, RoutingTrace, VisionTransformer
from wemoe.moe.block import MoEBlock
from wemoe.moe.rest import EmbeddingExperts, RoutedLayerNorm, RoutedLinearSmall, RoutedPatchEmbedding
from wemoe.moe.routers.task import feature_size as task_feature_size
from wemoe.moe.spec import MoESpec
from wemoe.moe.unseen import UnseenDetector


@dataclass
class Prediction:
    """What a merged model says about images without being told their task (``WEMoEModel.predict``)."""

    tasks: list[str]  # the task each image most likely belongs to
    task_index: torch.Tensor  # (B,) its index among the experts
    labels: torch.Tensor  # (B,) the class index in that task's head
    confidence: torch.Tensor  # (B,) p(task) * p(class | task)
    task_posterior: torch.Tensor  # (B, T)
    unseen: torch.Tensor | None = None  # (B,) bool: images the model says belong to no merged task (None: not asked)


class WEMoEModel(VisionTransformer):
    """``model(images)`` -> image embedding; ``model.logits(images, task)``; ``model.routing(images)``."""

    def __init__(self, arch: ViTArch, task_names: Sequence[str], spec: MoESpec, head_bias: bool = False):
        T = len(task_names)

        shared = spec.router.shared

        def block_fn(a: ViTArch, index: int) -> Block:
            if index not in spec.blocks:
                return Block(a)
            routers = {} if shared else {g: spec.router.build(a.width, T, spec.init_lambda) for g in spec.groups}
            return MoEBlock(a, T, spec.groups, spec.store, routers, spec.coef_range, spec.coef_guard, routed_norms=spec.rest)

        super().__init__(arch, head_bias=head_bias, block_fn=block_fn)
        if spec.rest:  # the stem and the embedding are routed too: their pretrained tensors plus task vectors
            self.patch_embed.proj = RoutedPatchEmbedding(arch.width, arch.patch_size, T, arch.patch_bias, spec.small_store)
            self.embed_experts = EmbeddingExperts(T, arch.num_tokens, arch.width)
            if arch.pre_norm:
                self.norm_pre = RoutedLayerNorm(arch.width, T, arch.layer_norm_eps)
            self.norm = RoutedLayerNorm(arch.width, T, arch.layer_norm_eps)
            if arch.embed_dim is not None:
                self.head = RoutedLinearSmall(arch.width, arch.embed_dim, T, head_bias, spec.small_store)
        self.task_names = list(task_names)
        self.spec = spec
        # a router computed once per image (from a pass with the pretrained routed weights) drives every routed group
        self.task_router = spec.router.build_shared(arch, T, spec.init_lambda) if shared else None
        # says which images belong to none of the merged tasks, and the coefficients that serve them
        self.unseen = UnseenDetector(task_feature_size(arch), T, spec.unseen_components) if spec.unseen != "route" else None
        self._fixed: torch.Tensor | None = None  # (T,) coefficients every sample gets while set (fixed_routing)

    @property
    def moe_blocks(self) -> list[int]:
        return list(self.spec.blocks)

    def moe_block_modules(self) -> list[MoEBlock]:
        return [self.blocks[b] for b in self.spec.blocks]  # type: ignore[misc]

    def routers(self) -> list[nn.Module]:
        """Every router, in routing order (the one shared router when it is computed once per image)."""
        if self.task_router is not None:
            return [self.task_router]
        return [self.blocks[b].routers[g] for b, g in self.spec.routes()]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for r in self.routers() for p in r.parameters()]

    def init_routers(self, seed: int, device: torch.device | str = "cpu") -> None:
        """Give every router (built on the meta device) real, seeded initial weights, in routing order."""
        torch.manual_seed(seed)
        for r in self.routers():
            r.materialize(device)
        if self.unseen is not None:
            self.unseen.materialize(device)

    def freeze_backbone(self) -> WEMoEModel:
        """Only routers train in WEMoE: everything else is frozen."""
        router = {id(p) for p in self.router_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in router)
        return self

    def tokens(self, images: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        if not self.spec.rest:
            return super().tokens(images)
        x = self.patch_embed.proj(images, given).flatten(2).transpose(1, 2)
        cls, pos = self.cls_token.expand(x.shape[0], -1, -1), self.pos_embed
        if given is not None:
            cls = cls + self.embed_experts.mix("cls_token", given).view(x.shape[0], 1, -1)
            pos = pos + self.embed_experts.mix("pos_embed", given).view(x.shape[0], *pos.shape[1:])
        x = torch.cat([cls.to(x.dtype), x], dim=1) + pos.to(x.dtype)
        return self.norm_pre(x, given) if isinstance(self.norm_pre, RoutedLayerNorm) else self.norm_pre(x)

    def embedding(self, cls: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        if not self.spec.rest:
            return super().embedding(cls)
        x = self.norm(cls, given)
        return self.head(x, given) if isinstance(self.head, RoutedLinearSmall) else self.head(x)

    def given_coefficients(self, images: torch.Tensor, trace: RoutingTrace | None = None) -> torch.Tensor | None:
        """(B, T) coefficients known before the routed pass: fixed routing, or the shared router's (with images of no
        merged task given the fallback coefficients); None for per-block routers. ``trace`` gets the posterior and flags."""
        if self._fixed is not None:
            return self._fixed.to(device=images.device).expand(images.shape[0], -1)
        if self.task_router is None:
            return None
        features = self.router_features(images)
        posterior = self.task_router(features)
        given, unseen = posterior, None
        if self.unseen is not None:
            unseen = self.unseen(features)
            given = torch.where(unseen[:, None], self.unseen.fallback.to(posterior.dtype), posterior)
        if trace is not None:
            trace.posterior, trace.unseen = posterior, unseen
        return given

    def encode(self, images: torch.Tensor, trace: RoutingTrace | None = None) -> torch.Tensor:
        if self._fixed is not None or self.task_router is not None:
            trace = trace if trace is not None else RoutingTrace()
            trace.given = self.given_coefficients(images, trace)
        return super().encode(images, trace)

    @torch.no_grad()
    def router_features(self, images: torch.Tensor) -> torch.Tensor:
        """What a shared router reads, from one pass with the pretrained weight of every routed linear:
        per block the token mean of its first norm's output and its class token, then the image embedding."""
        x = self.tokens(images)
        parts = []
        for block in self.blocks:
            h = block.norm1(x)
            parts += [h.mean(dim=1), x[:, 0]]
            x = x + block.attn(h, None)
            x = x + block.mlp(block.norm2(x), None)
        parts.append(self.embedding(x[:, 0]))
        return torch.cat(parts, dim=1).float()

    def routing(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Routing coefficients, one (B, T) tensor per routed group: blocks in order, in each block
        attention before MLP (``spec.routes()`` names them); experts in task order."""
        trace = RoutingTrace()
        self.encode(images, trace)
        return trace.routes

    def task_posterior(self, trace: RoutingTrace) -> torch.Tensor:
        """(B, T) how likely each image belongs to each task, from what a pass routed.

        A shared router's output is a posterior already; per-block routers' coefficients are
        averaged over the routed groups, negative ones cut to zero, and normalised.
        """
        if trace.posterior is not None:
            return trace.posterior.float()
        mean = torch.stack(trace.routes).float().mean(0).clamp_min(0)
        total = mean.sum(-1, keepdim=True)
        return torch.where(total > 0, mean / total.clamp_min(1e-12), torch.full_like(mean, 1.0 / mean.shape[-1]))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Task, class and confidence per image, without naming the task: the model's task posterior picks the head."""
        missing = [t for t in self.task_names if t not in self.heads]
        if missing:
            have = "has no heads" if not self.heads else f"has no head for task(s) {', '.join(missing)}"
            raise WemoeError(f"task-agnostic prediction needs every task's head: this model {have} (merge with --heads)")
        trace = RoutingTrace()
        features = self.encode(images, trace).float()
        posterior = self.task_posterior(trace)
        p_task, index = posterior.max(dim=-1)
        labels = torch.empty(len(images), dtype=torch.long, device=features.device)
        p_class = torch.empty(len(images), device=features.device)
        for t in index.unique().tolist():
            rows = index == t
            probs = torch.softmax(self.heads[self.task_names[t]].logits(features[rows]).float(), dim=-1)
            p_class[rows], labels[rows] = probs.max(dim=-1)
        return Prediction([self.task_names[i] for i in index.tolist()], index, labels, p_task * p_class, posterior, trace.unseen)

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
        self._fixed = c.to(self.cls_token.device)
        try:
            yield self
        finally:
            self._fixed = None

    @torch.no_grad()
    def plain_state(self, coefs: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The canonical state of a plain ViT: every routed linear merged with its group's (T,) coefficients, one row per routing entry."""
        keep = lambda k: ".experts." not in k and ".routers." not in k and not k.startswith(("task_router.", "embed_experts.", "unseen."))
        state = {k: v for k, v in self.state_dict().items() if keep(k)}
        rows = {route: torch.as_tensor(np.asarray(row)) for row, route in zip(coefs, self.spec.routes())}
        for (b, group), c in rows.items():
            for name, linear in self.blocks[b].routed_linears(group).items():
                weight, bias = linear.merged(c)
                state[f"blocks.{b}.{group}.{name}.weight"], state[f"blocks.{b}.{group}.{name}.bias"] = weight, bias
            if self.spec.rest:  # a block's norm goes with the group it feeds
                norm = "norm1" if group == "attn" else "norm2"
                state.update({f"blocks.{b}.{norm}.{k}": v for k, v in getattr(self.blocks[b], norm).merged(c).items()})
        if self.spec.rest:  # the stem and the embedding take the first routing entry's coefficients
            c = next(iter(rows.values()))
            for name in ("patch_embed.proj", "norm_pre", "norm", "head"):
                module = self.get_submodule(name)
                if hasattr(module, "merged"):
                    state.update({f"{name}.{k}": v for k, v in module.merged(c).items()})
            for name in ("cls_token", "pos_embed"):
                tau = getattr(self.embed_experts, name)
                state[name] = (state[name].float() + torch.tensordot(c.float(), tau.float(), dims=1)).to(state[name].dtype)
        return state


def parameter_count(arch: ViTArch, num_tasks: int, spec: MoESpec | None) -> int:
    """Numbers a merged model holds (parameters and buffers; routers included), counted on the meta device.

    ``spec`` None: a plain ViT of ``arch``."""
    with torch.device("meta"):
        model = VisionTransformer(arch) if spec is None else WEMoEModel(arch, [f"t{i}" for i in range(num_tasks)], spec)
    return sum(t.numel() for t in model.state_dict().values())


__all__ = ["Prediction", "WEMoEModel", "parameter_count"]
