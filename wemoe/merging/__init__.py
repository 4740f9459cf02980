"""Merging: validation of inputs, task vectors, static methods, the streaming engine."""
