"""Merge methods, one module each, found through the registry (see ``registry``).

Built in: ``average``, ``task-arithmetic``, ``ties`` (static, streamed tensor by
tensor), ``adamerging`` (coefficients adapted on unlabeled data, written as a
plain checkpoint) and ``wemoe`` (a mixture of experts with adapted routers).
"""

from wemoe.methods.registry import (
    REGISTRY,
    MergeMethod,
    ParamInfo,
    all_params,
    build_params,
    get_method,
    method_names,
    param,
    params_record,
    register,
)

# importing a method's module registers it; this order is the CLI's
from wemoe.methods import average  # noqa: F401  isort: skip
from wemoe.methods import task_arithmetic  # noqa: F401  isort: skip
from wemoe.methods import ties  # noqa: F401  isort: skip
from wemoe.methods import adamerging  # noqa: F401  isort: skip
from wemoe.methods import weight_ensembling  # noqa: F401  isort: skip

__all__ = ["REGISTRY", "MergeMethod", "ParamInfo", "all_params", "build_params", "get_method", "method_names", "param", "params_record", "register"]
