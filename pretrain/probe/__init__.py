"""Diagnostics of what a diffusion LM predicts far from visible context (DESIGN.md sec. 7)."""
