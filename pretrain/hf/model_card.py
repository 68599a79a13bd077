"""The model card (README.md) of an exported model: what it is, how to load it, how it was trained.

Final metrics come from the run's MLflow store (latest value of every metric); when the run was
not tracked or its store is gone, the card says so instead of inventing numbers.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.parallel.memory import parameter_counts

CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: fill-mask
tags:
- diffusion-language-model
- masked-diffusion
- dlm-pretrain
---

# {name}

A masked diffusion language model (LLaDA / MDLM-style) trained with dlm-pretrain: a bidirectional
Llama-style transformer (RMSNorm, SwiGLU, RoPE, no biases) that predicts the clean token at every
masked position. Exported from `{checkpoint}` at step {step}.

| | |
|---|---|
{arch_rows}

## Usage

```python
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

PATH = "path/to/this/directory"  # or its Hub repository id
tok = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForMaskedLM.from_pretrained(PATH, trust_remote_code=True, dtype=torch.bfloat16)
prompt = tok("the keys to the cabinet", return_tensors="pt").input_ids
out = model.diffusion_generate(prompt, max_new_tokens=64, steps=64, block_length=32)
print(tok.decode(out[0, prompt.shape[1]:]))
```

The mask token is `{mask_token}` (id {mask_id}); its logit, and those of vocabulary padding, are
-inf. Attention uses PyTorch SDPA (`attn_implementation="eager"` for the explicit reference);
`model.gradient_checkpointing_enable()` works for fine-tuning.

## Final metrics

{metrics}

## Training config

```yaml
{config}```
"""


def final_metrics(client, run_id: str | None) -> dict[str, float] | None:
    """Latest value of every metric of the run, or None when there is no tracked run."""
    if client is None or not run_id:
        return None
    return dict(sorted(client.get_run(run_id).data.metrics.items()))


def write_model_card(out: Path, model, metrics: dict[str, float] | None, config: dict) -> None:
    arch = {
        key: config[key]
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "rope_theta",
            "max_position_embeddings",
        )
    }
    total = parameter_counts(model.config.model, model.vocab_size)["total"]  # reads no tensor
    arch["parameters"] = f"{total / 1e6:.2f}M"
    if metrics:
        rows = "\n".join(f"| `{k}` | {v:.6g} |" for k, v in metrics.items())
        table = f"From MLflow run `{model.run_id}`:\n\n| metric | value |\n|---|---|\n{rows}"
    else:
        table = "Not available: no MLflow run was found for this checkpoint."
    card = CARD_TEMPLATE.format(
        name=model.config.run.name,
        checkpoint=model.path.name,
        step=model.step,
        arch_rows="\n".join(f"| {k} | {v} |" for k, v in arch.items()),
        mask_token=model.tokenizer.mask_token,
        mask_id=model.tokenizer.mask_id,
        metrics=table,
        config=model.config_yaml,
    )
    (out / "README.md").write_text(card)
