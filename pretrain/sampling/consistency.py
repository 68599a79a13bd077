"""Joint-consistency decoders built on the base sampler (`pretrain.sampling.sampler.generate`).

    remask_generate    after every parallel commit, score each generated token by the model's
                       own probability of it given the whole draft, p_theta(x_i | x); re-mask the
                       tokens below `threshold` and decode them again in later steps. For models
                       trained with `self_correction` or `multistep_consistency`, which learn to
                       give a token that disagrees with its neighbours a low probability.
    energy_resample    draw k candidates per sequence with the base sampler (temperature 1) and
                       importance-resample one with weights exp(-E(x)) from the `energy_nce` head.

Both count the model calls they make (`CallCounter`), since that is their price: remasking adds
one scoring call per step and the re-decoding steps; resampling multiplies the batch by k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pretrain.sampling.sampler import generate


class CallCounter:
    """Wraps `model_fn`; counts calls and sequences (rows) passed through it."""

    def __init__(self, model_fn: Callable[[torch.Tensor], torch.Tensor]):
        self.model_fn = model_fn
        self.calls = 0
        self.rows = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.model_fn(x)


def token_scores(model_fn, x: torch.Tensor, mask_id: int) -> torch.Tensor:
    """p_theta(x_i | x) [b, s] for every position, from one model call on the draft x [b, s]."""
    logits = model_fn(x).float()
    logits[..., mask_id] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return probs.gather(-1, x.clamp(max=probs.shape[-1] - 1)[..., None]).squeeze(-1)


def consistency_remask(
    model_fn, *, mask_id: int, prompt_len: int, threshold: float, stats: dict | None = None
):
    """A `remask_fn` for `generate`: re-mask generated tokens the model scores below `threshold`.

    Each row keeps the best-scoring token it committed in this step even if it is below the
    threshold, so every step makes progress: of a disagreeing pair committed together, one is
    kept and the other is decoded again given it. `stats["remasked"]` accumulates the number of
    re-masked tokens per row ([b]): the decoder's extra work, which a batch-level call count hides.
    """

    def remask(step, x, committed, logits):
        scores = token_scores(model_fn, x, mask_id)  # [b, s]
        generated = (x != mask_id) & (torch.arange(x.shape[1], device=x.device) >= prompt_len)
        suspicious = generated & (scores < threshold)
        best = scores.masked_fill(~committed, -1.0).argmax(dim=1, keepdim=True)  # [b, 1]
        keep = torch.zeros_like(committed).scatter_(1, best, True) & committed
        again = suspicious & ~keep
        if stats is not None:
            stats["remasked"] = stats.get("remasked", 0) + again.sum(dim=1).cpu()
        return again

    return remask


@torch.no_grad()
def remask_generate(
    model_fn,
    prompt_ids: torch.Tensor,
    *,
    gen_length: int,
    tokens_per_step: int,
    mask_id: int,
    threshold: float = 0.6,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    max_steps: int | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Parallel decoding with self-correcting re-masking -> tokens [b, p + gen_length]."""
    return generate(
        model_fn,
        prompt_ids,
        gen_length=gen_length,
        tokens_per_step=tokens_per_step,
        mask_id=mask_id,
        temperature=temperature,
        remask_fn=consistency_remask(
            model_fn,
            mask_id=mask_id,
            prompt_len=prompt_ids.shape[1],
            threshold=threshold,
            stats=stats,
        ),
        generator=generator,
        max_steps=max_steps,
    )


@torch.no_grad()
def energy_resample(
    model_fn,
    energy_fn: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids: torch.Tensor,
    *,
    k: int,
    gen_length: int,
    tokens_per_step: int,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """k-candidate energy resampling -> tokens [b, p + gen_length].

    The candidates are drawn from the parallel sampler q (temperature 1); resampling candidate j
    with probability proportional to exp(-E(x_j)) ~ p_data(x_j) / q(x_j) is self-normalised
    importance resampling towards the data distribution (exact as k -> infinity).
    """
    b = prompt_ids.shape[0]
    candidates = generate(
        model_fn,
        prompt_ids.repeat_interleave(k, dim=0),
        gen_length=gen_length,
        tokens_per_step=tokens_per_step,
        mask_id=mask_id,
        temperature=1.0,
        generator=generator,
    )  # [b * k, s]
    energy = energy_fn(candidates).float().view(b, k)
    pick = torch.multinomial(torch.softmax(-energy, dim=1).cpu(), 1, generator=generator)  # [b, 1]
    return candidates.view(b, k, -1)[torch.arange(b), pick.squeeze(1).to(candidates.device)]
