"""Torch modules: the canonical ViT encoder and the weight-ensembling MoE block."""
