"""Samplers: turn a trained diffusion LM into text (iterative unmasking, block decoding)."""
