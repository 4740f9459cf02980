"""The model card (``README.md``) of an output directory, rendered from its record.

The convention users know from model hubs: Hugging Face YAML front matter (library,
base models where their hub ids are known, tags, measured metrics), what the model is
(method, tasks in expert order, inputs with their sha256, parameters), how well it
does when that was measured, and how to load it, in a snippet that runs as pasted.
Written by ``write_output`` for every method; ``wemoe eval --card`` rewrites it with
the accuracies it measured.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wemoe.io.output import TMP_MARK
from wemoe.model.heads import stored_head_names
from wemoe.outputs.hub import front_matter, open_clip_name, timm_name
from wemoe.outputs.layout import CARD_FILE, HEADS_FILE, MOE_SECTION
from wemoe.schemes import TRANSFORMERS_SCHEMES

EXPORT_METHOD = "wemoe-export"
EXPORT_SUMMARY = "one task's mean routing of a WEMoE model baked into a plain ViT (`wemoe export`)"

# task -> {"accuracy": float in [0, 1], "n": images, "data": path}
Accuracy = Mapping[str, Mapping[str, Any]]


def _method_section(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """The method's own record: a mixture's description, else the section under the method's name."""
    moe = record.get(MOE_SECTION)
    section = moe if isinstance(moe, Mapping) else record.get(str(record.get("method")))
    return section if isinstance(section, Mapping) else {}


def _value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return f"`{text}`".replace("|", "\\|")


def _digest(sha256: Any) -> str:
    return "(a folder: not hashed)" if sha256 == "directory" else f"`{sha256}`"


def _inputs(record: Mapping[str, Any], heads: Sequence[str]) -> list[str]:
    inputs = record.get("inputs") or {}
    tasks = inputs.get("tasks") or {}
    lines = ["## Tasks, in expert order", "", "| # | task | checkpoint | scheme | sha256 | head |", "|---|---|---|---|---|---|"]
    for i, name in enumerate(record.get("tasks") or []):
        t = tasks.get(name, {})
        lines.append(f"| {i} | {name} | `{t.get('path', '-')}` | {t.get('scheme', '-')} | `{t.get('sha256', '-')}` | {'yes' if name in heads else 'no'} |")
    base = inputs.get("base")
    if base:
        lines += ["", f"Base: `{base.get('path')}` ({base.get('scheme')}), sha256 `{base.get('sha256')}`."]
    if record.get("source"):
        lines += ["", f"Exported from `{record['source']}`."]
    return lines


def _parameters(record: Mapping[str, Any]) -> list[str]:
    params = record.get("parameters") or {}
    lines = ["## Parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in params.items()]
    lines += [f"| seed | `{record.get('seed')}` |"] if "seed" in record else []
    adaptation = (_method_section(record)).get("adaptation") or {}
    data = adaptation.get("data") or {}
    if data:
        lines += ["", "Adapted on (unlabeled use of the images):", "", "| task | data | sha256 | split | images |", "|---|---|---|---|---|"]
        lines += [f"| {t} | `{d.get('path')}` | {_digest(d.get('sha256'))} | {d.get('split')} | {d.get('images')} |" for t, d in data.items()]
        if adaptation.get("final_loss") is not None:
            lines += ["", f"Adaptation loss {adaptation.get('initial_loss'):.4f} -> {adaptation.get('final_loss'):.4f} in {adaptation.get('steps')} steps."]
    return lines


def _accuracy(accuracy: Accuracy | None, where: str, heads: Sequence[str]) -> list[str]:
    lines = ["## Accuracy", ""]
    if not accuracy:
        task = f"{heads[0]}=:DATA" if heads else "NAME=HEAD:DATA"
        return lines + [f"Not measured yet: `wemoe eval {where} --task {task} ... --card` evaluates labelled data and records the result here."]
    agnostic = all("joint_accuracy" in r for r in accuracy.values())
    mean = lambda key: sum(r[key] for r in accuracy.values()) / len(accuracy)
    if not agnostic:
        lines += ["| task | accuracy | images | data |", "|---|---|---|---|"]
        lines += [f"| {t} | {100 * r['accuracy']:.2f}% | {r.get('n', '-')} | `{r.get('data', '-')}` |" for t, r in accuracy.items()]
        return lines + [f"| **average** | **{100 * mean('accuracy'):.2f}%** | | |"]
    lines += [
        "Accuracy with each task's head given, and task-agnostic (the model's task posterior picks the head): how often it names the "
        "image's task, and how often task and class are both right.",
        "",
        "| task | accuracy | task identified | joint (task-agnostic) | images | data |",
        "|---|---|---|---|---|---|",
    ]
    for t, r in accuracy.items():
        scores = " | ".join(f"{100 * r[k]:.2f}%" for k in ("accuracy", "task_accuracy", "joint_accuracy"))
        lines.append(f"| {t} | {scores} | {r.get('n', '-')} | `{r.get('data', '-')}` |")
    return lines + [
        f"| **average** | **{100 * mean('accuracy'):.2f}%** | **{100 * mean('task_accuracy'):.2f}%** | **{100 * mean('joint_accuracy'):.2f}%** | | |"
    ]


def _loading(record: Mapping[str, Any], where: str, heads: Sequence[str]) -> list[str]:
    """A snippet that runs as pasted: the real directory, inputs it defines, the library calls that fit this model."""
    scheme = record.get("scheme")
    moe = isinstance(record.get(MOE_SECTION), Mapping)
    arch = record.get("architecture") or {}
    path = json.dumps(where)
    size = arch.get("image_size")
    lines = [
        "## How to load",
        "",
        "```python",
        "import torch",
        "import wemoe",
        "",
        f"model = wemoe.load({path})  # no source checkpoints, no network, no transformers",
        f"images = torch.rand(2, 3, {size}, {size})  # stand-in: preprocessed images (wemoe.data.preprocess(uint8 NHWC array, model.arch))",
        "features = model(images)  # (B, E) image embedding",
    ]
    if heads:
        lines.append(f'logits = model.logits(images, "{heads[0]}")  # with that task\'s stored head')
    oc = open_clip_name(arch)
    lines += ["", "# in an open_clip pipeline: encode_image runs this model, the text tower stays"]
    if oc is not None:
        lines += [
            "import open_clip",
            "from wemoe.integrations.open_clip import use_merged_visual",
            "",
            f'clip_model = open_clip.create_model("{oc}")  # pass pretrained=... for the CLIP\'s own text tower',
            f"use_merged_visual(clip_model, {path})",
        ]
    else:
        lines.append(f"# use_merged_visual(clip_model, {path}) with an open_clip CLIP whose image tower has this architecture")
    if not moe:
        name = timm_name(arch)
        lines += ["", "# a timm VisionTransformer of the same architecture"]
        if name is not None:
            lines += [
                "import timm",
                "from wemoe.integrations.timm import use_merged_weights",
                "",
                f'timm_model = timm.create_model("{name}", num_classes={arch.get("embed_dim") or 0})',
                f"use_merged_weights(timm_model, {path})",
            ]
        else:
            lines.append(f"# use_merged_weights(timm_model, {path}) with a timm VisionTransformer of this architecture")
        if scheme in TRANSFORMERS_SCHEMES:
            cls = transformers_class(record)
            lines += [
                "",
                "# transformers (config.json is the model's own)",
                f"from transformers import {cls}",
                "",
                f"hf = {cls}.from_pretrained({path})",
            ]
    lines.append("```")
    if moe:
        lines += ["", "A mixture of experts routed per sample: only wemoe rebuilds it (`wemoe export --task NAME` writes a plain ViT for one task)."]
    else:
        lines += ["", f"A plain ViT in the {scheme} key scheme: its library loads `model.safetensors` with strict key matching."]
    return lines


def transformers_class(record: Mapping[str, Any]) -> str:
    """The transformers class that loads a plain output completely: with the projection only where there is one."""
    with_projection = (record.get("architecture") or {}).get("embed_dim") is not None
    return "CLIPVisionModelWithProjection" if with_projection else "CLIPVisionModel"


def output_directory(directory: Path) -> Path:
    """Where the output lives once written: outputs are rendered inside a temporary directory beside it."""
    name = directory.name
    if name.startswith(".") and TMP_MARK in name:
        directory = directory.with_name(name[1 : name.index(TMP_MARK)])
    return Path(os.path.abspath(directory))


def _title(record: Mapping[str, Any]) -> str:
    method, tasks = str(record.get("method")), [str(t) for t in record.get("tasks") or []]
    if method == EXPORT_METHOD:
        source = Path(str(record.get("source") or "")).name or "a WEMoE model"
        return f"# {', '.join(tasks)}: a plain ViT exported from the WEMoE model {source}"
    return f"# {method} merge of {len(tasks)} task{'s' if len(tasks) != 1 else ''}: {', '.join(tasks)}"


def render_card(
    record: Mapping[str, Any], summary: str, accuracy: Accuracy | None = None, directory: Path | None = None, heads: Sequence[str] | None = None
) -> str:
    """The card's text; deterministic for a given record and directory (no timings). ``summary``: what the method is, in one line.
    ``heads``: the tasks whose heads the directory stores (the record's list when not given)."""
    method = str(record.get("method"))
    arch = record.get("architecture") or {}
    where = str(directory) if directory is not None else "MODEL_DIR"
    heads = list(heads if heads is not None else record.get("heads") or [])
    head = [
        _title(record),
        "",
        f"Written by wemoe {(record.get('versions') or {}).get('wemoe', '')}: {summary}.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{method}` |",
        f"| architecture | width {arch.get('width')}, depth {arch.get('depth')}, patch {arch.get('patch_size')}, image {arch.get('image_size')}, "
        f"embed {arch.get('embed_dim')}, activation {arch.get('activation')} |",
        f"| key scheme | {record.get('scheme')} |",
        f"| dtype | {record.get('dtype')} |",
    ]
    parts = [head, _inputs(record, heads), _parameters(record), _accuracy(accuracy, where, heads), _loading(record, where, heads)]
    return front_matter(record, accuracy, Path(where).name) + "\n\n".join("\n".join(p) for p in parts) + "\n"


def write_card(directory: Path, record: Mapping[str, Any], summary: str, accuracy: Accuracy | None = None) -> None:
    """Write (or replace, atomically) ``directory/README.md``, naming the directory the output ends up in."""
    path = directory / CARD_FILE
    heads_file = directory / HEADS_FILE
    heads = record.get("heads") or (stored_head_names(heads_file) if heads_file.is_file() else [])
    tmp = path.with_name(f".{CARD_FILE}.{os.getpid()}.tmp")
    tmp.write_text(render_card(record, summary, accuracy, output_directory(directory), heads))
    os.replace(tmp, path)


__all__ = ["EXPORT_METHOD", "EXPORT_SUMMARY", "output_directory", "render_card", "transformers_class", "write_card"]
