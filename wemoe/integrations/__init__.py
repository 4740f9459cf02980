"""A merged model inside other libraries' pipelines.

- ``wemoe.integrations.open_clip.use_merged_visual(clip_model, "out/")``: the merged
  encoder (WEMoE or static) becomes the CLIP model's image tower; ``encode_image`` and
  zero-shot classification with its text tower then run on it.
- ``wemoe.integrations.timm.use_merged_weights(timm_model, "out/")``: a static merge's
  weights in a timm ``VisionTransformer`` of the same architecture.

Neither module imports the library it serves; it works on the model object you pass.
"""
