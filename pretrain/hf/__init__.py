"""Hugging Face interoperability: `dlm export` (checkpoint -> `transformers` model directory with
self-contained modeling code) and `dlm import` (Llama/Qwen2 causal LM -> our weights)."""
