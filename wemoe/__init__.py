"""wemoe: merge task-finetuned vision transformers into one model.

Weight-ensembling mixture of experts (Tang et al., ICML 2024) plus the classic
static baselines (average, task arithmetic, TIES).

Quick use::

    import wemoe
    model = wemoe.load("out/")          # a directory written by `wemoe merge`
    feats = model(images)               # (B, 3, H, W) -> (B, E)
    logits = model.logits(images, "mnist")

    out = wemoe.merge(base="base.safetensors", tasks={"mnist": "mnist.safetensors", "cars": "cars.safetensors"},
                      method="task-arithmetic", out="merged/")
"""

from wemoe._version import __version__
from wemoe.errors import WemoeError


def load(path, device="cpu"):
    """Load a directory written by ``wemoe merge`` (or ``wemoe export``) as a ready ``torch.nn.Module``.

    WEMoE outputs come back as the mixture-of-experts model, static merges as a plain
    ViT; both give the image embedding from ``model(images)`` and class logits from
    ``model.logits(images, task)`` with the stored heads.
    """
    from wemoe.outputs.loading import load_output

    return load_output(path, device=device)


def merge(config=None, **kwargs):
    """Merge checkpoints exactly as ``wemoe merge`` does; see :func:`wemoe.api.merge`."""
    from wemoe.api import merge as _merge

    return _merge(config, **kwargs)


__all__ = ["WemoeError", "load", "merge", "__version__"]
