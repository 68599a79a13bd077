"""Diagnostics of what a diffusion LM predicts far from visible context (docs/design.md §7)."""
