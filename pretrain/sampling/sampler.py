"""Iterative-unmasking samplers for masked diffusion LMs.

Stable API (other decoders build on it):

    generate(model_fn, prompt_ids [b, p], *, gen_length, tokens_per_step, mask_id,
             block_length=None, temperature=0.0, order="confidence", schedule=None,
             remask_fn=None, generator=None) -> tokens [b, p + gen_length]

* `model_fn(x [b, s]) -> logits [b, s, V]` (float; the mask id's logit is ignored: the mask is
  never emitted). It sees the prompt, the committed tokens and `mask_id` everywhere else.
* Decoding starts from `prompt ; <mask> * gen_length` and commits `tokens_per_step` masked
  positions per model call (fewer on the last step of a block) until none is left, so one block of
  n masks takes ceil(n / tokens_per_step) calls.
* `block_length` (semi-autoregressive block decoding, as block diffusion trains): the generated
  span is split into blocks of this many tokens, decoded left to right; a block's masks are only
  committed once every earlier block is complete. None decodes the whole span as one block.
* `temperature`: 0 takes the argmax; > 0 samples from softmax(logits / temperature).
* `order` (registry `ORDERS`) picks which masked positions to commit at a step:
    - `confidence`: the highest probability of the drawn token (LLaDA's low-confidence remasking);
    - `schedule`: the positions the training schedule masks last, i.e. with the largest clean
      probability alpha_i(t) at the current time (ties by position). This is the reverse of the
      forward process the model was trained on; `schedule` (a `NoiseSchedule`) is required, and
      distances are measured from the end of the prompt (as prefix conditioning trains them).
    - `left_to_right`: the leftmost masked positions (autoregressive order).
* `remask_fn(step, x [b, s], committed [b, s] bool, logits [b, s, V]) -> bool [b, s] | None`:
  called after each commit; positions it returns True for (outside the prompt) are set back to
  `mask_id` and decoded again later. For self-correction / re-masking decoders. The step budget
  grows by one model call per re-masked group of `tokens_per_step` tokens, capped by
  `max_steps` (default 4 * the no-remask count) so a decoder that always re-masks terminates.
* `generator`: a torch.Generator for temperature sampling (reproducible decoding).

Everything runs under `torch.no_grad()` on the device of `prompt_ids`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor], torch.Tensor]
RemaskFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
# (confidence [b, s], masked [b, s] bool, step time t in (0, 1], prompt_len, schedule) -> score;
# the highest-scoring masked positions are committed.
OrderFn = Callable[..., torch.Tensor]

ORDERS: dict[str, OrderFn] = {}


def register_order(name: str):
    def wrap(fn: OrderFn) -> OrderFn:
        ORDERS[name] = fn
        return fn

    return wrap


@register_order("confidence")
def _by_confidence(confidence, masked, t, prompt_len, schedule):
    return confidence


@register_order("left_to_right")
def _left_to_right(confidence, masked, t, prompt_len, schedule):
    s = masked.shape[1]
    return -torch.arange(s, device=masked.device, dtype=torch.float32).expand_as(confidence)


@register_order("schedule")
def _by_schedule(confidence, masked, t, prompt_len, schedule):
    if schedule is None:
        raise ValueError("order='schedule' needs the `schedule` the model was trained with")
    b, s = masked.shape
    # distance from the end of the visible prompt: 0 for the first generated token
    distance = (torch.arange(s, device=masked.device) - prompt_len).clamp(min=0).float()
    tt = torch.full((b,), float(t), dtype=torch.float32, device=masked.device)
    alpha = schedule.position_alpha(tt, distance.expand(b, s))  # [b, s]
    # larger alpha = stays clean longer in the forward process = revealed earlier in reverse;
    # a tiny position term breaks ties left to right.
    return alpha.float() - 1e-6 * distance / max(s, 1)


def _pick(scores: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the top-k[b] scoring eligible positions -> bool [b, s]."""
    scores = scores.masked_fill(~eligible, float("-inf"))
    order = scores.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < k[:, None]) & eligible


@torch.no_grad()
def generate(
    model_fn: ModelFn,
    prompt_ids: torch.Tensor,
    *,
    gen_length: int,
    tokens_per_step: int,
    mask_id: int,
    block_length: int | None = None,
    temperature: float = 0.0,
    order: str = "confidence",
    schedule=None,
    remask_fn: RemaskFn | None = None,
    generator: torch.Generator | None = None,
    max_steps: int | None = None,
) -> torch.Tensor:
    """Decode `gen_length` tokens after `prompt_ids` [b, p]; returns tokens [b, p + gen_length]."""
    if gen_length <= 0 or tokens_per_step <= 0:
        raise ValueError("gen_length and tokens_per_step must be positive")
    if order not in ORDERS:
        raise ValueError(f"order: unknown '{order}' (expected one of: {', '.join(ORDERS)})")
    block_length = block_length or gen_length
    b, p = prompt_ids.shape
    device = prompt_ids.device
    x = torch.cat(
        [prompt_ids, torch.full((b, gen_length), mask_id, dtype=prompt_ids.dtype, device=device)],
        dim=1,
    )
    position = torch.arange(p + gen_length, device=device)
    blocks = math.ceil(gen_length / block_length)
    planned = sum(
        math.ceil(min(block_length, gen_length - i * block_length) / tokens_per_step)
        for i in range(blocks)
    )
    budget = max_steps if max_steps is not None else 4 * planned
    step = 0
    for block in range(blocks):
        lo, hi = p + block * block_length, min(p + (block + 1) * block_length, p + gen_length)
        in_block = (position >= lo) & (position < hi)  # [s]
        block_steps = math.ceil((hi - lo) / tokens_per_step)
        done_in_block = 0
        while bool(((x == mask_id) & in_block).any()) and step < budget:
            masked = (x == mask_id) & in_block  # [b, s]
            logits = model_fn(x).float()  # [b, s, V]
            logits[..., mask_id] = float("-inf")
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                drawn = torch.multinomial(
                    probs.reshape(-1, probs.shape[-1]), 1, generator=generator
                ).view(b, -1)
            else:
                probs = torch.softmax(logits, dim=-1)
                drawn = logits.argmax(dim=-1)
            confidence = probs.gather(-1, drawn[..., None]).squeeze(-1)  # [b, s]
            # time of this step within the block's own clock: 1 -> 0 as the block fills in
            t = 1.0 - done_in_block / max(block_steps, 1)
            scores = ORDERS[order](confidence, masked, t, p, schedule)
            k = masked.sum(dim=1).clamp(max=tokens_per_step)
            commit = _pick(scores, masked, k)
            x = torch.where(commit, drawn.to(x.dtype), x)
            step += 1
            done_in_block += 1
            if remask_fn is not None:
                again = remask_fn(step, x, commit, logits)
                if again is not None:
                    again = again & (position >= p)
                    x = torch.where(again, torch.full_like(x, mask_id), x)
        if step >= budget and bool((x == mask_id).any()):
            # out of budget (a re-masking decoder kept undoing): commit the rest greedily
            logits = model_fn(x).float()
            logits[..., mask_id] = float("-inf")
            x = torch.where(x == mask_id, logits.argmax(-1).to(x.dtype), x)
    return x
