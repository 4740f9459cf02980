"""Static methods: a merge that is a function of each tensor's base and task vectors, no data."""

from __future__ import annotations

from typing import Any

from wemoe.methods.registry import MergeMethod, MethodContext, MethodResult, TensorMerge


class StaticMethod(MergeMethod):
    """A data-free merge, tensor by tensor: subclasses give ``tensor_merge(params)``."""

    def tensor_merge(self, params: Any) -> TensorMerge:
        raise NotImplementedError

    def run(self, ctx: MethodContext, state: Any) -> MethodResult:
        return MethodResult(f"{self.name}, {len(ctx.inputs.tasks)} tasks", merge=self.tensor_merge(ctx.params))


__all__ = ["StaticMethod"]
