"""Sharded, crash-safe checkpoints (save / resume)."""
