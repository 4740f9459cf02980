"""``wemoe inspect``: what a checkpoint or output is, as wemoe reads it, in words a user reads.

Text by default: parameters and file size against a plain model of the same architecture,
experts, routed groups, rank and energy kept, router kind, adaptation in one line.
``--json`` prints the raw record instead (config.json / wemoe.json of an output).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import torch

from wemoe.checkpoints.adapters import is_lora_adapter, read_lora_adapter, resolve_targets
from wemoe.checkpoints.checkpoint import open_checkpoint
from wemoe.core.arch import ViTArch
from wemoe.core.runtime import dtype_name, parse_dtype
from wemoe.io.sources import open_source
from wemoe.model.heads import stored_head_names
from wemoe.model.vit import VisionTransformer
from wemoe.outputs.artifact import OutputRecord, read_output
from wemoe.outputs.layout import MOE_SECTION
from wemoe.outputs.moe_module import record_spec

WIDTH = 15  # label column


def _line(label: str, value: str) -> str:
    return f"{label + ':':<{WIDTH}}{value}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def plain_parameters(arch: ViTArch) -> int:
    """Parameters of a plain ViT of ``arch`` (what one fine-tuned model holds)."""
    with torch.device("meta"):
        return sum(p.numel() for p in VisionTransformer(arch).parameters())


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _stored(path: Path) -> tuple[int, int]:
    """(parameters, bytes) of the model files of an output directory."""
    source = open_source(path)
    return sum(_numel(source.shape(k)) for k in source.keys()), sum(f.stat().st_size for f in source.files())


def _short(value: Any) -> str:
    """A parameter's value in a few words: long lists of numbers are summarised, not dumped."""
    flat: list[Any] = []

    def walk(v: Any) -> None:
        if isinstance(v, list):
            for x in v:
                walk(x)
        else:
            flat.append(v)

    if isinstance(value, list):
        walk(value)
        numbers = [x for x in flat if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if len(flat) > 6 and len(numbers) == len(flat):
            return f"{len(flat)} values in [{min(numbers):.3g}, {max(numbers):.3g}]"
        if len(flat) > 6:
            return f"{len(flat)} values"
        return ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in flat)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return f"{len(value)} entries"
    return str(value)


def adaptation_summary(adaptation: Mapping[str, Any]) -> list[str]:
    """The adaptation record in one line (and its warnings on their own lines)."""
    if not adaptation:
        return [_line("adaptation", "none (not adapted)")]
    data = adaptation.get("data") or {}
    images = "+".join(str(d.get("images", "?")) for d in data.values())
    splits = sorted({str(d.get("split")) for d in data.values() if d.get("split")})
    parts = [f"{adaptation.get('steps')} steps on {images} unlabeled images of {len(data)} task(s)" + (f" ({', '.join(splits)} split)" if splits else "")]
    if adaptation.get("lr") is not None:
        parts.append(f"lr {adaptation['lr']:g}" + (", cosine" if adaptation.get("cosine") else ""))
    if adaptation.get("batch_size") is not None:
        parts.append(f"batch {adaptation['batch_size']} per task")
    if adaptation.get("initial_loss") is not None and adaptation.get("final_loss") is not None:
        parts.append(f"loss {adaptation['initial_loss']:.4f} -> {adaptation['final_loss']:.4f}")
    lines = [_line("adaptation", "; ".join(parts))]
    if adaptation.get("objective"):
        lines.append(_line("objective", str(adaptation["objective"])))
    lines += [_line("warning", str(w)) for w in adaptation.get("warnings") or []]
    return lines


def _energy(moe: Mapping[str, Any]) -> str | None:
    energy = moe.get("energy_kept")
    if not isinstance(energy, Mapping) or not energy:
        return None
    values = [float(v) for vs in energy.values() for v in (vs if isinstance(vs, list) else [vs])]
    if not values:
        return None
    mean = sum(values) / len(values)
    return (
        f"{100 * mean:.1f}% of each task vector's squared norm on average (min {100 * min(values):.1f}%, max {100 * max(values):.1f}%, {len(energy)} matrices)"
    )


def _size_lines(record: OutputRecord) -> list[str]:
    stored, nbytes = _stored(record.path)
    plain = plain_parameters(record.architecture)
    element = torch.empty((), dtype=parse_dtype(record.dtype) or torch.float32).element_size()
    return [
        _line("parameters", f"{stored:,} stored; a plain model of this architecture has {plain:,} ({stored / plain:.2f}x)"),
        _line("file size", f"{_size(nbytes)}; a plain model in {record.dtype}: {_size(plain * element)} ({nbytes / (plain * element):.2f}x)"),
    ]


def _heads_line(record: OutputRecord) -> list[str]:
    heads = stored_head_names(record.heads_path) if record.heads_path is not None else []
    return [_line("heads", ", ".join(heads) if heads else "none (model.logits needs heads: merge with --heads)")]


def describe_moe(record: OutputRecord) -> list[str]:
    moe = record.section(MOE_SECTION)
    spec = record_spec(record)  # a record naming an unknown kind is the file's error (exit 1)
    routed = [f"{b}.{g}" for b, g in spec.routes()]
    rank = moe.get("rank")
    store = spec.store.describe()
    experts = f"{len(record.tasks)} ({', '.join(record.tasks)}), one per task, " + (
        "dense task vectors" if store == "dense" else f"{store} factors" if rank is None else f"rank-{rank} SVD factors of each task vector"
    )
    lines = [
        _line("kind", f"WEMoE mixture of experts (method {record.method}, format {record.format_version}); only wemoe loads it"),
        _line("architecture", record.architecture.summary()),
        _line("base scheme", record.scheme),
        _line("dtype", record.dtype),
        *_size_lines(record),
        _line("experts", experts),
        _line("routed groups", f"{spec.describe_routed()} in blocks {', '.join(map(str, spec.blocks))} ({len(routed)} routed groups)"),
    ]
    if rank is not None:
        lines.append(_line("rank", str(rank)))
    energy = _energy(moe)
    if energy is not None:
        lines.append(_line("energy kept", energy))
    coef = moe.get("coef_range")
    coefs = f"coefficients in [{coef[0]:g}, {coef[1]:g}] ({spec.coef_guard})" if isinstance(coef, list) and len(coef) == 2 else "coefficients unbounded"
    lines.append(_line("router", f"{spec.router.describe()}; lambda {spec.init_lambda:g}; {coefs}"))
    lines += adaptation_summary(moe.get("adaptation") or {})
    lines += _heads_line(record)
    return lines


def describe_plain_output(record: OutputRecord) -> list[str]:
    params = record.parameters
    if record.method == "wemoe-export":
        source = record.raw.get("source", "?")
        what = f"{params.get('task')}'s mean routing over {params.get('images')} images of {params.get('data')}, baked in from {source}"
        method = _line("method", f"wemoe-export: {what}")
        routing = params.get("mean_routing")
        lines = [method, _line("mean routing", _short(routing))] if routing is not None else [method]
    else:
        shown = ", ".join(f"{k} {_short(v)}" for k, v in params.items())
        lines = [_line("method", record.method + (f" ({shown})" if shown else ""))]
    lines.append(_line("tasks", ", ".join(record.tasks)))
    if "seed" in record.raw:
        lines.append(_line("seed", str(record.raw["seed"])))
    lines += adaptation_summary(record.method_section.get("adaptation") or {}) if record.method_section.get("adaptation") else []
    lines += _heads_line(record)
    return lines


def describe_checkpoint(path: str, arch: str | None) -> tuple[list[str], dict[str, Any]]:
    ckpt = open_checkpoint(path, arch)
    counts = {"mlp": 0, "other": 0}
    for key in ckpt.keys():
        counts["mlp" if ".mlp." in key else "other"] += _numel(ckpt.shape(key))
    a = ckpt.arch
    dtype = dtype_name(ckpt.dtype("blocks.0.mlp.fc1.weight"))
    nbytes = sum(f.stat().st_size for f in ckpt.source.files())
    lines = [
        _line("scheme", ckpt.scheme + (f" (prefix '{ckpt.prefix}')" if ckpt.prefix else "")),
        _line("architecture", a.summary()),
        _line("activation", f"{a.activation}  (from: {a.source})"),
        _line("parameters", f"{counts['mlp'] + counts['other']:,} (MLPs {counts['mlp']:,}, other {counts['other']:,})"),
        _line("file size", _size(nbytes)),
        _line("dtype", dtype),
    ]
    if ckpt.match.ignored:
        lines.append(_line("ignored", f"{len(ckpt.match.ignored)} tensors outside the image tower"))
    raw = {
        "path": str(path),
        "scheme": ckpt.scheme,
        "prefix": ckpt.prefix,
        "architecture": a.to_dict(),
        "parameters": counts["mlp"] + counts["other"],
        "mlp_parameters": counts["mlp"],
        "dtype": dtype,
        "bytes": nbytes,
        "ignored": len(ckpt.match.ignored),
    }
    return lines, raw


def describe_adapter(path: str) -> tuple[list[str], dict[str, Any]]:
    """A LoRA adapter folder: what it adapts and by how much, without a base."""
    adapter = read_lora_adapter(path)
    naming, prefix, targets, left_out = resolve_targets(adapter)
    keys = sorted({t.key for t in targets})
    blocks = sorted({int(k.split(".")[1]) for k in keys if k.startswith("blocks.")})
    parts = sorted({k.split(".", 2)[2].rsplit(".", 1)[0] if k.startswith("blocks.") else k.rsplit(".", 1)[0] for k in keys})
    ranks = sorted({t.factor.rank for t in targets})
    scale = "alpha / sqrt(r)" if adapter.rslora else "alpha / r"
    lines = [
        _line("kind", f"PEFT LoRA adapter (a task for wemoe merge --tasks NAME={path})"),
        _line("rank", ", ".join(map(str, ranks)) + f" (config r {adapter.rank})"),
        _line("alpha", f"{adapter.alpha:g} (scale {scale})"),
        _line("targets", f"{len(targets)} modules in {naming.name} naming" + (f" under '{prefix}'" if prefix else "")),
        _line("adapts", f"{', '.join(parts)} in blocks {', '.join(map(str, blocks))}" if blocks else ", ".join(parts)),
        _line("parameters", f"{sum(t.factor.down.numel() + t.factor.up.numel() for t in targets):,} in the factors"),
    ]
    if left_out:
        lines.append(_line("left out", f"{len(left_out)} modules outside the image tower"))
    raw = {"path": str(path), "kind": "peft-lora", "rank": adapter.rank, "alpha": adapter.alpha, "rslora": adapter.rslora, "naming": naming.name}
    raw["targets"] = {t.factor.module: {"key": t.key, "rank": t.factor.rank, "scale": t.factor.scale} for t in targets}
    return lines, raw


def run_inspect(path: str, arch: str | None, as_json: bool = False) -> None:
    if is_lora_adapter(path):
        lines, raw = describe_adapter(path)
        click.echo(json.dumps(raw, indent=2) if as_json else "\n".join([_line("path", str(path)), *lines]))
        return
    record = read_output(path)
    if as_json and record is not None:
        click.echo(json.dumps(record.raw, indent=2))
        return
    if record is not None and record.is_moe:
        click.echo("\n".join([_line("path", str(path)), _line("tasks", ", ".join(record.tasks)), *describe_moe(record)]))
        return
    lines, raw = describe_checkpoint(path, arch)
    if as_json:
        click.echo(json.dumps(raw, indent=2))
        return
    lines = [_line("path", str(path)), *lines]
    if record is not None:
        lines.append(_line("kind", f"plain ViT written by wemoe (format {record.format_version})"))
        lines += describe_plain_output(record)
    click.echo("\n".join(lines))
