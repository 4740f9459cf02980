"""What every benchmark shares: where results go, which machine measured them, the real CLI, generated README blocks,
and CLIP-scale random checkpoints."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SPEED_CACHE = REPO / "benchmarks" / "cache" / "speed"  # CLIP-scale checkpoints, made once and reused


def cli(*args) -> None:
    """The real ``wemoe`` CLI, in-process; its stdout tables are dropped (the JSON reports are read)."""
    from wemoe.cli import main as wemoe_main

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            wemoe_main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"wemoe {' '.join(map(str, args[:2]))} failed with exit {exc.code}") from None


def replace_readme_block(name: str, body: str) -> bool:
    """Replace the README's generated block ``<!-- name:start -->`` ... ``<!-- name:end -->`` (False if it has none)."""
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text or not body:
        return False
    readme.write_text(text[: text.index(start)] + start + "\n" + body.strip("\n") + "\n" + text[text.index(end) :])
    return True


def machine_description() -> str:
    """CPU model and widest vector ISA: ratios differ between CPUs (an AVX2 EPYC and an
    AVX-512 Xeon gave 1.74x and 2.35x for the same forward), so every result names its machine."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {isa}, {os.cpu_count()} cores"


def machine_tag(description: str) -> str:
    """A file-name tag for a machine description: its CPU family and ISA (``xeon-avx512``, ``epyc-avx2``)."""
    model, isa = description.split(",")[0].lower(), description.split(",")[1].strip().lower().replace("-", "")
    family = next((f for f in ("xeon", "epyc", "core", "ryzen") if f in model), "cpu")
    return f"{family}-{isa.replace(' ', '')}"


def make_checkpoints(arch: str, experts: int, directory: Path, spec: dict | None = None) -> tuple[Path, list[Path]]:
    """Base + ``experts`` fine-tune-like copies, written once and reused (``spec``: shapes of an arch wemoe has no name for)."""
    import torch
    from open_clip.transformer import QuickGELU, VisionTransformer

    from wemoe.core.arch import KNOWN_ARCHS
    from wemoe.io.safetensors_io import save_tensors

    a = spec or KNOWN_ARCHS[arch]
    directory.mkdir(parents=True, exist_ok=True)
    base_path = directory / "base.safetensors"
    task_paths = [directory / f"task{i:02d}.safetensors" for i in range(experts)]
    meta = {"heads": str(a["heads"]), "activation": a["activation"]}
    if base_path.exists() and all(p.exists() for p in task_paths):
        return base_path, task_paths
    torch.manual_seed(0)
    act = QuickGELU if a["activation"] == "quick_gelu" else torch.nn.GELU
    model = VisionTransformer(
        image_size=a["image_size"],
        patch_size=a["patch_size"],
        width=a["width"],
        layers=a["depth"],
        heads=a["heads"],
        mlp_ratio=a["mlp_width"] / a["width"],
        output_dim=a["embed_dim"],
        act_layer=act,
    )
    base = {"visual." + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del model
    if not base_path.exists():
        save_tensors(base_path, base, meta)
    g = torch.Generator().manual_seed(1)
    for p in task_paths:
        if p.exists():
            continue
        task = {}
        for k, v in base.items():
            if v.is_floating_point() and v.numel() > 1:
                noise = torch.randn(v.shape, generator=g)
                rel = 0.01 + 0.02 * torch.rand((), generator=g).item()
                task[k] = (v + noise * (rel * v.norm() / noise.norm())).contiguous()
            else:
                task[k] = v
        save_tensors(p, task, meta)
    return base_path, task_paths
