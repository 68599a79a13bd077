"""`model_fn` adapters: a trained model as the samplers call it, `x [b, s] -> logits [b, s, V]`.

What a model trained with each objective needs at generation time (the attention pattern it
decodes under, a one-token shift of its logits, the sampler options that match its training)
is the objective's to say (`generation_mask`, `align_logits`, `decode_defaults` in
`pretrain.diffusion.objective` and its subclasses); these functions only look the objective up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _objective(diffusion_cfg, seq_len: int = 128):
    from pretrain.diffusion.objective import build_objective

    # the mask id plays no part in generation adapters
    return build_objective(diffusion_cfg, mask_id=0, seq_len=seq_len)


def objective_model_fn(
    module, diffusion_cfg, *, seq_len: int = 128
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model_fn` for a `DLMTransformer` trained with `diffusion_cfg`'s objective."""
    objective = _objective(diffusion_cfg, seq_len)
    device = next(module.parameters()).device

    def run(x: torch.Tensor) -> torch.Tensor:
        mask = objective.generation_mask(x.shape[1], device)
        return objective.align_logits(module(x.to(device), attention_mask=mask).float())

    return run


def decode_defaults(diffusion_cfg, seq_len: int) -> dict:
    """Sampler keyword arguments that match training: order, schedule, block length."""
    return _objective(diffusion_cfg, seq_len).decode_defaults(seq_len)
