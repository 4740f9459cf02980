"""Small random-init stand-ins for what CLIP-merging users download, laid out the same way.

    eval "$(python -m benchmarks.clip_standins standins/)"

writes, under the directory given (about 30 MB, a few seconds)::

    clip/open_clip_config.json      open_clip's hub layout (as timm/vit_base_patch32_clip_224.openai):
    clip/open_clip_model.safetensors    a full CLIP, image and text towers, QuickGELU
    finetuned/<task>/               Hugging Face CLIPVisionModel folders (as FusionBench's tanganke/clip-vit-base-patch32_<task>)
    classes/<task>.txt              class names, one per line, in label order
    data/<task>/<class>/*.png       a few test images per class
    arch.json                       what the weights cannot tell wemoe (the real model's is --arch ViT-B-32-quickgelu)

for the eight standard tasks, and prints the shell variables the README's CLIP
section uses (W, ARCH, TASKS, STEPS: 20 adaptation steps instead of the paper's
1000, so the whole try takes minutes on a laptop CPU). Every number the flow prints
on them is meaningless: they only make the real flow runnable without downloads.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
CLASSES = {  # a few of each dataset's real class names, in sorted (label) order
    "sun397": ["abbey", "airplane cabin", "airport terminal"],
    "stanford-cars": ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"],
    "resisc45": ["airplane", "airport", "baseball diamond"],
    "eurosat": ["annual crop land", "brushland or shrubland", "forest"],
    "svhn": ["0", "1", "2"],
    "gtsrb": ["red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit", "red and white circle 50 kph speed limit"],
    "mnist": ["0", "1", "2"],
    "dtd": ["banded", "blotchy", "braided"],
}
# ViT-B/32's layout at a small size: 64 channels per head in both towers, QuickGELU, CLIP's tokenizer and context
MODEL_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
IMAGES_PER_CLASS = 4
STEPS = 20


def write_clip(root: Path) -> Path:
    """A random-init open_clip CLIP in open_clip's hub folder layout; returns the weights file."""
    from open_clip.model import CLIP

    from wemoe.io.safetensors_io import save_tensors

    torch.manual_seed(0)
    model = CLIP(**MODEL_CFG)
    folder = root / "clip"
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2) + "\n")
    path = folder / "open_clip_model.safetensors"
    save_tensors(path, {k: v.contiguous() for k, v in model.state_dict().items()})
    return path


def write_finetuned(root: Path, clip: Path, arch: Path) -> None:
    """Fine-tune-like image towers: the CLIP's own, every tensor moved by 2% of its norm, in HF CLIPVisionModel layout."""
    from wemoe.checkpoints.checkpoint import open_checkpoint
    from wemoe.io.safetensors_io import save_tensors
    from wemoe.outputs.hf_config import vision_model_config
    from wemoe.schemes import get_scheme

    base = open_checkpoint(clip, str(arch))
    hf = get_scheme("hf_clip")
    config = vision_model_config(None, base.arch, torch.float32)
    config["architectures"] = ["CLIPVisionModel"]  # like FusionBench's: no projection, wemoe takes the base's
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(100 + i)
        native: dict[str, torch.Tensor] = {}
        for key, tensor in base.items():
            if key == "head.weight":
                continue
            noise = torch.randn(tensor.shape, generator=g)
            moved = tensor + 0.02 * noise * tensor.norm() / noise.norm()
            native.update(hf.to_native(key, moved.contiguous(), ""))
        folder = root / "finetuned" / task
        folder.mkdir(parents=True)
        save_tensors(folder / "model.safetensors", {k: v.contiguous() for k, v in native.items()})
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_tasks(root: Path) -> None:
    """Class-name files and tiny test-image folders (one sub-folder per class, images of varied sizes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for task in TASKS:
        (root / "classes").mkdir(exist_ok=True)
        (root / "classes" / f"{task}.txt").write_text("\n".join(CLASSES[task]) + "\n")
        for label, name in enumerate(CLASSES[task]):
            folder = root / "data" / task / name
            folder.mkdir(parents=True)
            for k in range(IMAGES_PER_CLASS):
                side = int(rng.integers(32, 64))
                tint = np.array([80 * label, 255 - 80 * label, 40 * k], dtype=np.int64)
                pixels = np.clip(rng.integers(0, 120, (side, side, 3)) + tint, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to create (must not exist)")
    args = parser.parse_args(argv)
    root: Path = args.out
    if root.exists():
        parser.error(f"{root} exists; remove it or name another directory")
    root.mkdir(parents=True)
    arch = root / "arch.json"
    arch.write_text(json.dumps({"activation": "quick_gelu"}) + "\n")  # heads follow width // 64 as in every OpenAI CLIP
    clip = write_clip(root)
    write_finetuned(root, clip, arch)
    write_tasks(root)
    print(f"wrote stand-ins to {root}", file=sys.stderr)
    print(f"export W={shlex.quote(str(root))} ARCH={shlex.quote(str(arch))} TASKS={shlex.quote(' '.join(TASKS))} STEPS={STEPS}")


if __name__ == "__main__":
    main()
