"""wemoe: merge task-finetuned vision transformers into one model.

Weight-ensembling mixture of experts (Tang et al., ICML 2024) plus the classic
static baselines (average, task arithmetic, TIES).

Quick use::

    import wemoe
    model = wemoe.load("out/")          # a directory written by `wemoe merge`
    feats = model(images)               # (B, 3, H, W) -> (B, E)
    logits = model.logits(images, "mnist")
"""

__version__ = "0.1.0"

from wemoe.errors import WemoeError  # noqa: E402


def load(path, device="cpu"):
    """Load a directory written by ``wemoe merge`` as a ready ``torch.nn.Module``."""
    from wemoe.saved import load_merged

    return load_merged(path, device=device)


__all__ = ["WemoeError", "load", "__version__"]
