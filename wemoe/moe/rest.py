"""Every other weight fine-tuning changed, routed too (``--experts all``): norms, embeddings, projection.

They are small (a few percent of a ViT), so their task vectors are kept whole and merged
per sample directly: ``theta_b = theta_0 + sum_t c_bt tau_t``. With them routed, one-hot
coefficients give each fine-tuned model exactly and zero coefficients the pretrained one.
Called without coefficients, each module is its pretrained self (the pass a shared router
reads). Each keeps its pretrained tensors under the usual names and their task vectors
under ``experts.``, so a plain checkpoint is one merge away (:meth:`merged`).

The two matrices among them (the patch embedding, a linear map of each patch's pixels,
and the projection) can instead be kept by the blocks' expert store
(``--small-experts compressed``: rank-R factors, int8 if asked): at ViT-B/32 their whole
task vectors are most of what ``--experts all`` adds to a file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wemoe.moe.experts import ExpertStore, ExpertStoreKind


class TaskVectorStack(nn.Module):
    """The (T, *shape) task vectors of named tensors, as buffers."""

    def __init__(self, num_experts: int, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_buffer(name, torch.empty(num_experts, *shape))

    def mix(self, name: str, coefs: torch.Tensor) -> torch.Tensor:
        """``sum_t c_bt tau_t`` per sample: (B, *shape)."""
        tau = getattr(self, name)
        return (coefs.to(tau.dtype) @ tau.reshape(tau.shape[0], -1)).view(coefs.shape[0], *tau.shape[1:])


def _merged(base: torch.Tensor, experts: TaskVectorStack, name: str, coefs: torch.Tensor) -> torch.Tensor:
    """One coefficient vector (T,): the plain tensor theta_0 + sum_t c_t tau_t, merged in float32."""
    tau = getattr(experts, name)
    c = torch.as_tensor(coefs).reshape(1, -1).to(device=tau.device, dtype=torch.float32)
    return (base.float() + (c @ tau.float().reshape(tau.shape[0], -1)).view(base.shape)).to(base.dtype)


class RoutedLayerNorm(nn.Module):
    def __init__(self, width: int, num_experts: int, eps: float = 1e-5):
        super().__init__()
        self.width, self.eps = int(width), float(eps)
        self.register_buffer("weight", torch.empty(width))
        self.register_buffer("bias", torch.empty(width))
        self.experts = TaskVectorStack(num_experts, {"weight": (width,), "bias": (width,)})

    def forward(self, x: torch.Tensor, coefs: torch.Tensor | None = None) -> torch.Tensor:
        if coefs is None:
            return F.layer_norm(x, (self.width,), self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        w = (self.weight + self.experts.mix("weight", coefs)).to(x.dtype)
        b = (self.bias + self.experts.mix("bias", coefs)).to(x.dtype)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.width,)
        return F.layer_norm(x, (self.width,), None, None, self.eps) * w.view(shape) + b.view(shape)

    @torch.no_grad()
    def merged(self, coefs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": _merged(self.weight, self.experts, "weight", coefs), "bias": _merged(self.bias, self.experts, "bias", coefs)}


class RoutedLinearSmall(nn.Module):
    """A linear layer on (B, in) rows (the projection), merged per sample: x W0^T + b0 + sum_t c_bt (x dW_t^T + db_t)."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, bias: bool, store: ExpertStoreKind | None = None):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = int(in_features), int(out_features), bool(bias)
        self.register_buffer("weight", torch.empty(out_features, in_features))
        shapes = {"weight": (out_features, in_features)}
        if bias:
            self.register_buffer("bias", torch.empty(out_features))
            shapes["bias"] = (out_features,)
        self.experts: TaskVectorStack | ExpertStore
        self.experts = TaskVectorStack(num_experts, shapes) if store is None else store.build(num_experts, in_features, out_features)

    def forward(self, x: torch.Tensor, coefs: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if self.has_bias else None
        if coefs is not None and isinstance(self.experts, ExpertStore):  # its expert bias is zero where the layer has none
            return self.experts.apply(x[:, None], coefs, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))[:, 0]
        y = F.linear(x, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        if coefs is None:
            return y
        per_task = torch.einsum("bi,toi->bto", x, self.experts.weight.to(x.dtype))  # (B, T, out)
        y = y + torch.einsum("bt,bto->bo", coefs.to(x.dtype), per_task)
        return y + self.experts.mix("bias", coefs).to(x.dtype) if self.has_bias else y

    @torch.no_grad()
    def merged(self, coefs: torch.Tensor) -> dict[str, torch.Tensor]:
        return _merged_matrix(self, coefs)


def _merged_matrix(module: RoutedLinearSmall | RoutedPatchEmbedding, coefs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain weight (and bias) of a routed matrix for one coefficient vector, from whole or stored task vectors."""
    experts = module.experts
    if isinstance(experts, TaskVectorStack):
        out = {"weight": _merged(module.weight, experts, "weight", coefs)}
        if module.has_bias:
            out["bias"] = _merged(module.bias, experts, "bias", coefs)
        return out
    dw, db = experts.delta(torch.as_tensor(coefs))
    out = {"weight": (module.weight.float() + dw.float().view(module.weight.shape)).to(module.weight.dtype)}
    if module.has_bias:
        out["bias"] = (module.bias.float() + db.float()).to(module.bias.dtype)
    return out


class RoutedPatchEmbedding(nn.Module):
    """The patchifying convolution, merged per sample: conv(x, W0) + sum_t c_bt conv(x, dW_t) (+ biases)."""

    def __init__(self, width: int, patch: int, num_experts: int, bias: bool, store: ExpertStoreKind | None = None):
        super().__init__()
        self.width, self.patch, self.has_bias = int(width), int(patch), bool(bias)
        self.register_buffer("weight", torch.empty(width, 3, patch, patch))
        shapes = {"weight": (width, 3, patch, patch)}
        if bias:
            self.register_buffer("bias", torch.empty(width))
            shapes["bias"] = (width,)
        # stored: the convolution as the linear map of each patch's 3 * patch * patch pixels (unfold's order is the weight's)
        self.experts: TaskVectorStack | ExpertStore
        self.experts = TaskVectorStack(num_experts, shapes) if store is None else store.build(num_experts, 3 * patch * patch, width)

    def forward(self, images: torch.Tensor, coefs: torch.Tensor | None = None) -> torch.Tensor:
        dtype = images.dtype
        bias = self.bias.to(dtype) if self.has_bias else None
        if coefs is not None and isinstance(self.experts, ExpertStore):
            patches = F.unfold(images, self.patch, stride=self.patch).transpose(1, 2)  # (B, h*w, 3*p*p)
            y = self.experts.apply(patches, coefs, self.weight.reshape(self.width, -1).to(dtype), bias)  # (B, h*w, D)
            h, w = images.shape[-2] // self.patch, images.shape[-1] // self.patch
            return y.transpose(1, 2).reshape(images.shape[0], self.width, h, w)
        y = F.conv2d(images, self.weight.to(dtype), bias, stride=self.patch)
        if coefs is None:
            return y
        tau = self.experts.weight
        T = tau.shape[0]
        per_task = F.conv2d(images, tau.reshape(T * self.width, 3, self.patch, self.patch).to(dtype), stride=self.patch)  # (B, T*D, h, w)
        per_task = per_task.view(images.shape[0], T, self.width, *per_task.shape[-2:])
        y = y + torch.einsum("bt,btdhw->bdhw", coefs.to(dtype), per_task)
        return y + self.experts.mix("bias", coefs).to(dtype)[:, :, None, None] if self.has_bias else y

    @torch.no_grad()
    def merged(self, coefs: torch.Tensor) -> dict[str, torch.Tensor]:
        return _merged_matrix(self, coefs)


class EmbeddingExperts(TaskVectorStack):
    """The task vectors of the class token (T, 1, 1, D) and the position embedding (T, 1, N, D)."""

    def __init__(self, num_experts: int, tokens: int, width: int):
        super().__init__(num_experts, {"cls_token": (1, 1, width), "pos_embed": (1, tokens, width)})


__all__ = ["EmbeddingExperts", "RoutedLayerNorm", "RoutedLinearSmall", "RoutedPatchEmbedding", "TaskVectorStack"]
