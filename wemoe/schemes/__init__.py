"""Key schemes: converters between each library's checkpoint layout and ours.

The canonical layout is timm's ``VisionTransformer`` (``blocks.N.mlp.fc1.weight``,
``cls_token`` as [1, 1, D], ``head.weight`` as [E, D]). Every other module works
on canonical keys only; open_clip and Hugging Face CLIP (under ``vision_model.``, and
bare as transformers 5's ``CLIPVisionModel`` saves it) are converted here, at the
edges, in both directions, so a merge is written back in the layout the user
started from.
"""

from wemoe.schemes.rules import MLP_SUFFIXES, SCHEMES, TRANSFORMERS_SCHEMES, Scheme, SchemeMatch, detect_scheme, get_scheme

__all__ = ["Scheme", "SchemeMatch", "SCHEMES", "detect_scheme", "get_scheme", "MLP_SUFFIXES", "TRANSFORMERS_SCHEMES"]
