"""Diffusion maths: noise schedules, the corruption process and the training objectives."""
