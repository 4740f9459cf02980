"""Routers, one module per kind (``--router``): how a routed group turns its tokens into coefficients."""

from wemoe.moe.routers.base import ROUTERS, RouterCheck, RouterKind, keep_top_k

# importing a kind's module registers it; this order is the CLI's
from wemoe.moe.routers.learned import ConstantRouter, LinearRouter, MlpRouter, Router  # isort: skip
from wemoe.moe.routers.prototype import Prototype, PrototypeRouter  # isort: skip
from wemoe.moe.routers.subspace import Subspace, SubspaceRouter  # isort: skip
from wemoe.moe.routers.task import Task, TaskRouter  # isort: skip
from wemoe.moe.routers.exemplar import Exemplar, ExemplarRouter  # isort: skip

__all__ = [
    "ROUTERS",
    "ConstantRouter",
    "Exemplar",
    "ExemplarRouter",
    "LinearRouter",
    "MlpRouter",
    "Prototype",
    "PrototypeRouter",
    "Router",
    "RouterCheck",
    "RouterKind",
    "Subspace",
    "SubspaceRouter",
    "Task",
    "TaskRouter",
    "keep_top_k",
]
