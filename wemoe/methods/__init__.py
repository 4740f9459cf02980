"""Merge methods, one module each, found through the registry (see ``registry``).

Built in: ``average``, ``task-arithmetic``, ``ties`` (static, a function of each
tensor's task vectors), ``adamerging`` (coefficients adapted on unlabeled data,
a plain checkpoint) and ``wemoe`` (a mixture of experts with adapted routers;
the package ``wemoe.methods.wemoe``).
"""

from wemoe.core.params import ParamInfo, component, param
from wemoe.methods.registry import (
    REGISTRY,
    MergeMethod,
    MethodContext,
    MethodResult,
    TensorMerge,
    all_params,
    build_params,
    get_method,
    method_names,
    params_record,
    register,
)
from wemoe.methods.static import StaticMethod

# importing a method's module registers it; this order is the CLI's
from wemoe.methods import average  # noqa: F401  isort: skip
from wemoe.methods import task_arithmetic  # noqa: F401  isort: skip
from wemoe.methods import ties  # noqa: F401  isort: skip
from wemoe.methods import adamerging  # noqa: F401  isort: skip
from wemoe.methods.wemoe import method as _wemoe  # noqa: F401  isort: skip

__all__ = [
    "REGISTRY",
    "MergeMethod",
    "MethodContext",
    "MethodResult",
    "ParamInfo",
    "StaticMethod",
    "TensorMerge",
    "all_params",
    "build_params",
    "component",
    "get_method",
    "method_names",
    "param",
    "params_record",
    "register",
]
