"""`model_fn` adapters: what a model trained with each objective needs at generation time.

    masked    bidirectional logits as they are
    ar_adapt  with `diffusion.shift`, hidden state i predicts token i+1: logits move one right
    block     block-causal attention (`block_causal_mask`) over blocks of `diffusion.block_length`
              counted from position 0, so the prompt must end on a block boundary
    ar        causal attention and the shift; decode left to right, one token per step
plus `decode_defaults`, the sampler options matching the objective and schedule it was trained
with (the `schedule` order reuses the training alpha_i(t)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pretrain.model.attention import block_causal_mask, causal_mask


def _shift_right(logits: torch.Tensor) -> torch.Tensor:
    """out_i = logits_{i-1} (position 0 keeps its own; it is always part of the prompt)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def objective_model_fn(module, diffusion_cfg) -> Callable[[torch.Tensor], torch.Tensor]:
    objective = diffusion_cfg.objective
    device = next(module.parameters()).device

    def run(x, mask=None):
        return module(x.to(device), attention_mask=mask).float()

    if objective == "block":
        block = diffusion_cfg.block_length
        return lambda x: run(x, block_causal_mask(x.shape[1], block, device)[None, None])
    if objective == "ar":
        return lambda x: _shift_right(run(x, causal_mask(x.shape[1], device)[None, None]))
    if objective == "ar_adapt" and diffusion_cfg.shift:
        return lambda x: _shift_right(run(x))
    return run


def decode_defaults(diffusion_cfg, seq_len: int) -> dict:
    """Sampler keyword arguments that match training: order, schedule, block length."""
    from pretrain.diffusion.schedules import build_schedule

    objective = diffusion_cfg.objective
    if objective == "ar":
        return {"order": "left_to_right", "tokens_per_step": 1}
    if objective == "block":
        return {"order": "confidence", "block_length": diffusion_cfg.block_length}
    schedule = build_schedule(diffusion_cfg.schedule, diffusion_cfg, horizon=seq_len)
    if schedule.position_aware:
        return {"order": "schedule", "schedule": schedule}
    return {"order": "confidence"}
