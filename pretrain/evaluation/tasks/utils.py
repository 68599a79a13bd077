"""Hooks of the local task YAMLs in this directory (`!function utils.<name>`)."""

from pretrain.evaluation.agreement import completion_results, load_local, load_long

__all__ = ["completion_results", "load_local", "load_long"]
