"""The standalone WEMoE checkpoint: one directory that rebuilds the merged model
without any source checkpoint, network, or transformers.

``model.safetensors`` (or shards + index) holds every tensor of the module
(task-arithmetic weights, pretrained routed weights, task vectors, routers) under
its module path; config.json's ``wemoe`` section holds what is needed to rebuild
the module around them (see ``wemoe.outputs.artifact`` for the directory layout).

Format versions: 2 (routed linears: ``blocks.N.<group>.<linear>.{weight,bias}``,
``...experts.*``, ``blocks.N.routers.<group>.*``); 1 (MLP-only, written by wemoe
0.1) is read by converting its keys (:func:`upgrade_v1_state`).
"""

from __future__ import annotations

import re

import torch

from wemoe.errors import WemoeError
from wemoe.io.sources import open_source
from wemoe.moe.model import WEMoEModel
from wemoe.moe.spec import MoESpec
from wemoe.outputs.artifact import OutputRecord
from wemoe.outputs.layout import MOE_SECTION
from wemoe.outputs.record_checks import check_finite, check_moe_shapes, load_stored_heads

_V1_MLP = {
    "fc1_weight": ("fc1.weight", False),
    "fc1_bias": ("fc1.bias", False),
    "fc2_weight_t": ("fc2.weight", True),
    "fc2_bias": ("fc2.bias", False),
    "expert_fc1_weight": ("fc1.experts.weight", False),
    "expert_fc1_bias": ("fc1.experts.bias", False),
    "expert_fc2_weight_t": ("fc2.experts.weight_t", False),
    "expert_fc2_bias": ("fc2.experts.bias", False),
}


def upgrade_v1_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format 1 keys (``blocks.N.mlp.fc1_weight``, ``blocks.N.mlp.router.*``) -> format 2."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^(blocks\.\d+)\.mlp\.(.+)$", key)
        if m and m.group(2) in _V1_MLP:
            name, transpose = _V1_MLP[m.group(2)]
            out[f"{m.group(1)}.mlp.{name}"] = value.t().contiguous() if transpose else value
        elif m and m.group(2).startswith("router."):
            out[f"{m.group(1)}.routers.mlp.{m.group(2)[len('router.') :]}"] = value
        else:
            out[key] = value
    return out


def record_spec(record: OutputRecord) -> MoESpec:
    """The mixture a record describes; a record that cannot describe one is the file's error (exit 1), never a crash."""
    path = record.path
    try:
        return MoESpec.from_record(record.section(MOE_SECTION))
    except WemoeError as exc:  # an unknown router or expert store named in the record
        raise WemoeError(f"config.json: {str(exc).removeprefix(str(path) + ': ')}", path=path) from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise WemoeError(
            f"config.json's '{MOE_SECTION}' section cannot describe a mixture of experts ({type(exc).__name__}: {str(exc)[:200]})", path=path
        ) from None


def load_wemoe(record: OutputRecord, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WEMoEModel:
    """Rebuild a WEMoE model from its output directory's record and tensors."""
    path = record.path
    source = open_source(path)
    check_moe_shapes(record.architecture, record.tasks, source, path)  # headers only: nothing is read or built yet
    spec = record_spec(record)
    heads = load_stored_heads(path, record.tasks, record.architecture.output_dim) if record.heads_path is not None else None
    state = {k: source.get(k) for k in source.keys()}
    check_finite(state, path)
    if record.format_version < 2:
        state = upgrade_v1_state(state)
    with torch.device("meta"):
        model = WEMoEModel(record.architecture, record.tasks, spec, head_bias="head.bias" in state)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WemoeError(f"model.safetensors does not match config.json ({str(exc).splitlines()[0]})", path=path) from None
    if heads is not None:
        model.heads = heads
    return model.freeze_backbone().to(device).eval()


def describe_wemoe(record: OutputRecord) -> list[str]:
    moe = record.section(MOE_SECTION)
    spec = record_spec(record)
    return [
        "method:        wemoe (weight-ensembling MoE)",
        f"moe blocks:    {list(spec.blocks)}  routed {spec.describe_routed()}  experts {spec.store.describe()}",
        f"routers:       {spec.router.describe()}  lambda {spec.init_lambda}  coef range {moe.get('coef_range')} ({spec.coef_guard})",
        f"adaptation:    {moe.get('adaptation')}",
    ]


__all__ = ["describe_wemoe", "load_wemoe", "record_spec", "upgrade_v1_state"]
