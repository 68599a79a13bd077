"""Parallel runtime: process groups, device/precision and the DeepSpeed engine."""
