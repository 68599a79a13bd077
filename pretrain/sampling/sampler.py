"""Iterative-unmasking samplers for masked diffusion LMs.

Stable API (other decoders build on it):

    infill(model_fn, x [b, s], *, tokens_per_step, mask_id, block_length=None,
           block_origin=None, temperature=0.0, order="confidence", schedule=None,
           remask_fn=None, generator=None) -> tokens [b, s]
    generate(model_fn, prompt_ids [b, p], *, gen_length, ...) -> tokens [b, p + gen_length]

`infill` decodes every `mask_id` position of `x`, wherever it is (prefix, middle spans, suffix,
different per row), and never writes any other position: the context comes back bit for bit.
`generate` is `infill` of `prompt ; <mask> * gen_length`.

* `model_fn(x [b, s]) -> logits [b, s, V]` (float; the mask id's logit is ignored: the mask is
  never emitted). It sees the prompt, the committed tokens and `mask_id` everywhere else.
* Decoding commits `tokens_per_step` masked positions per model call (fewer on the last step of
  a block) until none is left, so one block of n masks takes ceil(n / tokens_per_step) calls.
* `block_length` (semi-autoregressive block decoding, as block diffusion trains): positions are
  split into blocks of this many tokens counted from `block_origin` (default: the row's first
  masked position, i.e. the end of a prompt), decoded left to right; a block's masks are only
  committed once every earlier block is complete. None decodes all masks as one block. A model
  trained with the `block` objective counts its blocks from position 0: `block_origin=0`.
* `temperature`: 0 takes the argmax; > 0 samples from softmax(logits / temperature).
* `order` (registry `ORDERS`) picks which masked positions to commit at a step:
    - `confidence`: the highest probability of the drawn token (LLaDA's low-confidence remasking);
    - `schedule`: the positions the training schedule masks last, i.e. with the largest clean
      probability alpha_i(t) at the current time (ties by position). This is the reverse of the
      forward process the model was trained on; `schedule` (a `NoiseSchedule`) is required, and
      a position's distance is counted from the last context position before it (the end of
      the prompt for `generate`; as prefix conditioning trains it).
    - `left_to_right`: the leftmost masked positions (autoregressive order).
* `remask_fn(step, x [b, s], committed [b, s] bool, logits [b, s, V]) -> bool [b, s] | None`:
  called after each commit; positions it returns True for (never the context) are set back to
  `mask_id` and decoded again later. For self-correction / re-masking decoders. The step budget
  grows by one model call per re-masked group of `tokens_per_step` tokens, capped by
  `max_steps` (default 4 * the no-remask count) so a decoder that always re-masks terminates.
* `generator`: a torch.Generator for temperature sampling (reproducible decoding).

Everything runs under `torch.no_grad()` on the device of the input tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor], torch.Tensor]
RemaskFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
# (confidence [b, s], eligible [b, s] bool, step time t [b] in (0, 1], distance [b, s] from the
# context (None unless order="schedule"), schedule) -> score [b, s]; the highest-scoring
# eligible positions are committed.
OrderFn = Callable[..., torch.Tensor]

ORDERS: dict[str, OrderFn] = {}


def register_order(name: str):
    def wrap(fn: OrderFn) -> OrderFn:
        ORDERS[name] = fn
        return fn

    return wrap


@register_order("confidence")
def _by_confidence(confidence, masked, t, distance, schedule):
    return confidence


@register_order("left_to_right")
def _left_to_right(confidence, masked, t, distance, schedule):
    s = masked.shape[1]
    return -torch.arange(s, device=masked.device, dtype=torch.float32).expand_as(confidence)


@register_order("schedule")
def _by_schedule(confidence, masked, t, distance, schedule):
    if schedule is None:
        raise ValueError("order='schedule' needs the `schedule` the model was trained with")
    s = masked.shape[1]
    # distance [b, s] from the last context position before i: 0 right after a prompt
    alpha = schedule.position_alpha(t.float(), distance)  # [b, s] float64
    # larger alpha = stays clean longer in the forward process = revealed earlier in reverse;
    # ties (every alpha is 0 at t = 1) go to the position nearest its context, then leftmost.
    # float64: the tie terms are below float32's resolution near alpha = 1
    position = torch.arange(s, device=masked.device, dtype=torch.float64)
    return alpha.double() - (1e-6 * distance.double() + 1e-9 * position) / max(s, 1)


def top_k_mask(scores: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the top-k[b] scoring eligible positions -> bool [b, s]."""
    scores = scores.masked_fill(~eligible, float("-inf"))
    order = scores.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < k[:, None]) & eligible


def draw(logits: torch.Tensor, mask_id: int, temperature: float, generator=None):
    """logits [b, s, V] -> (probs [b, s, V], drawn ids [b, s]): a sample from
    probs = softmax(logits / temperature), or at temperature 0 the argmax with
    probs = softmax(logits); never the mask id (its logit is set to -inf in place)."""
    logits[..., mask_id] = float("-inf")
    if temperature <= 0:
        return torch.softmax(logits, dim=-1), logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return probs, torch.multinomial(flat, 1, generator=generator).view(logits.shape[:-1])


def _block_ids(masked: torch.Tensor, block_length: int | None, origin: int | None) -> torch.Tensor:
    """Block of every position [b, s] long: floor((i - origin) / block_length), `origin` the
    row's first masked position when None; one block (0) without `block_length`."""
    b, s = masked.shape
    if block_length is None:
        return torch.zeros(b, s, dtype=torch.long, device=masked.device)
    position = torch.arange(s, device=masked.device).expand(b, s)
    if origin is None:
        first = torch.where(masked, position, s).min(dim=1, keepdim=True).values  # [b, 1]
    else:
        first = torch.full((b, 1), origin, dtype=torch.long, device=masked.device)
    return torch.div(position - first, block_length, rounding_mode="floor")


@torch.no_grad()
def infill(
    model_fn: ModelFn,
    x: torch.Tensor,
    *,
    tokens_per_step: int,
    mask_id: int,
    block_length: int | None = None,
    block_origin: int | None = None,
    temperature: float = 0.0,
    order: str = "confidence",
    schedule=None,
    remask_fn: RemaskFn | None = None,
    generator: torch.Generator | None = None,
    max_steps: int | None = None,
) -> torch.Tensor:
    """Decode every `mask_id` position of `x` [b, s]; every other position is context and is
    returned unchanged. Returns tokens [b, s] without masks.

    Masks may sit anywhere (a prefix, middle spans, a suffix; different per row). With
    `block_length`, blocks are counted from `block_origin` (default: each row's first masked
    position) and a row commits in block k only once its blocks < k hold no mask. The
    `schedule` order measures each position's distance from the last context position before it
    (as training measures it from a clean prefix or prompt).
    """
    from pretrain.diffusion.objective import context_distance

    if tokens_per_step <= 0:
        raise ValueError("tokens_per_step must be positive")
    if order not in ORDERS:
        raise ValueError(f"order: unknown '{order}' (expected one of: {', '.join(ORDERS)})")
    if order == "schedule" and schedule is None:
        raise ValueError("order='schedule' needs the `schedule` the model was trained with")
    editable = x == mask_id  # [b, s]: the positions to decode; the rest is never written
    b, s = x.shape
    rows = torch.arange(b, device=x.device)
    block = _block_ids(editable, block_length, block_origin)  # [b, s]
    if bool((editable & (block < 0)).any()):
        raise ValueError(f"block_origin {block_origin} lies after a masked position")
    span = int(block.max()) + 1 if bool(editable.any()) else 1
    # model calls a row needs without re-masking: sum over its blocks of ceil(masks / k)
    per_block = torch.zeros(b, span + 1, dtype=torch.long, device=x.device)
    per_block.scatter_add_(1, torch.where(editable, block, span).clamp(0, span), editable.long())
    block_steps = (per_block[:, :span] + tokens_per_step - 1) // tokens_per_step  # [b, span]
    planned = int(block_steps.sum(dim=1).max()) if bool(editable.any()) else 0
    budget = max_steps if max_steps is not None else 4 * planned
    distance = context_distance(~editable, x).float() if order == "schedule" else None
    current = torch.full((b,), -1, dtype=torch.long, device=x.device)  # each row's block
    done_in_block = torch.zeros(b, dtype=torch.long, device=x.device)
    step = 0
    while bool((x == mask_id).any()) and step < budget:
        masked = x == mask_id
        # a row works on its first block that still holds masks
        row_block = torch.where(masked, block, span).min(dim=1).values  # [b]
        done_in_block = torch.where(row_block == current, done_in_block, 0)
        current = row_block
        eligible = masked & (block == row_block[:, None])
        logits = model_fn(x).float()  # [b, s, V]
        probs, drawn = draw(logits, mask_id, temperature, generator)
        confidence = probs.gather(-1, drawn[..., None]).squeeze(-1)  # [b, s]
        # time of this step on the row's block clock: 1 -> 0 as the block fills in
        steps = block_steps[rows, row_block.clamp(max=span - 1)].clamp(min=1)
        t = 1.0 - done_in_block.double() / steps.double()  # [b]
        scores = ORDERS[order](confidence, eligible, t, distance, schedule)
        k = eligible.sum(dim=1).clamp(max=tokens_per_step)
        commit = top_k_mask(scores, eligible, k)
        x = torch.where(commit, drawn.to(x.dtype), x)
        step += 1
        done_in_block = done_in_block + 1
        if remask_fn is not None:
            again = remask_fn(step, x, commit, logits)
            if again is not None:
                x = torch.where(again & editable, torch.full_like(x, mask_id), x)
    if bool((x == mask_id).any()):
        # out of budget (a re-masking decoder kept undoing): commit the rest greedily
        logits = model_fn(x).float()
        logits[..., mask_id] = float("-inf")
        x = torch.where(x == mask_id, logits.argmax(-1).to(x.dtype), x)
    return x


@torch.no_grad()
def generate(
    model_fn: ModelFn, prompt_ids: torch.Tensor, *, gen_length: int, mask_id: int, **options
) -> torch.Tensor:
    """Decode `gen_length` tokens after `prompt_ids` [b, p]; returns tokens [b, p + gen_length].
    `options`: those of `infill` (tokens_per_step, block_length, temperature, order, ...)."""
    if gen_length <= 0:
        raise ValueError("gen_length must be positive")
    b = prompt_ids.shape[0]
    masks = torch.full((b, gen_length), mask_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    return infill(model_fn, torch.cat([prompt_ids, masks], dim=1), mask_id=mask_id, **options)
