"""The DeepSpeed engine: ZeRO, precision, gradient accumulation and clipping around our model.

The optimizer is a plain torch AdamW handed to DeepSpeed (fused kernel on CUDA), which keeps the
engine identical on CPU and GPU: DeepSpeed's own Adam variants need compiled ops.
"""

from __future__ import annotations

import math

import torch

from pretrain.config import Config
from pretrain.parallel.runtime import Runtime


def deepspeed_config(cfg: Config, rt: Runtime) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": rt.dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # we log ourselves
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: Config, rt: Runtime) -> torch.optim.Optimizer:
    """AdamW; norms (1-D weights) are not decayed, matrices and embeddings are."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.adam_eps,
        fused=rt.device.type == "cuda",
    )


def build_engine(model: torch.nn.Module, cfg: Config, rt: Runtime):
    """Wrap the model in a DeepSpeed engine with AdamW and the warmup+cosine LR schedule."""
    import deepspeed

    model.to(rt.device)
    optimizer = build_optimizer(model, cfg, rt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step,
            warmup=cfg.optim.warmup_steps,
            total=cfg.train.steps,
            min_ratio=cfg.optim.min_lr_ratio,
        ),
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, rt),
    )
    return engine


def global_grad_norm(engine) -> float | None:
    """Pre-clipping global gradient norm of the last optimizer step (ZeRO stages report it)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)
