"""Joint-consistency decoders built on the base sampler (`pretrain.sampling.sampler`).

    remask_decode      ReMDM-style: decode every mask in parallel, then for `loop_steps` steps
                       score every committed token against the current sequence and re-mask the
                       lowest-scoring ones within a per-step budget (`BUDGETS`); each step's
                       forward also re-decodes the tokens re-masked at the step before. For
                       models trained with `self_correction` (or `multistep_consistency`), which
                       learn to give a token that disagrees with the rest a low probability.
    energy_resample    draw k candidates per sequence with the base sampler (temperature 1) and
                       importance-resample one with weights exp(-E(x)) from the `energy_nce` head.

Both count the model calls they make (`CallCounter`), since that is their price: re-masking adds
`loop_steps + 1` forwards (the `masked` score one more batch per step); resampling multiplies
the batch by k.

The score (registry `SCORES`) of a committed token x_i:

    visible   p_theta(x_i | x): the model's output at position i on the sequence as it is, x_i
              visible. It comes from the forward the step runs anyway (no extra call). A plain
              masked-diffusion model is never trained at visible positions, so there it carries
              no signal; `self_correction` trains exactly this output (predict x0_i from a draft
              holding the model's own parallel samples), so that it ranks a committed token that
              disagrees with its context low. This is the default.
    masked    p_theta(x_i | x with x_i masked): the leave-one-out conditional, what any masked
              model is trained to predict, at the price of one forward per scored token (a batch
              of b x committed rows per step). A reference for what a plain model knows.

Why a budget and not a threshold: a probability threshold has to be calibrated per model and
text (honest per-token probabilities on open text sit below any threshold that separates the
pair task's certain tokens), while ranking only needs the score to order tokens; the budget
fixes the price in re-decoded tokens per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pretrain.sampling.sampler import draw, generate, infill, top_k_mask


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


def _probabilities(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    return torch.softmax(logits, dim=-1)


def visible_scores(model_fn, x, logits, *, mask_id, candidates):
    """p_theta(x_i | x) [b, s] from this step's logits (x_i visible)."""
    probs = _probabilities(logits, mask_id)
    return probs.gather(-1, x.clamp(max=probs.shape[-1] - 1)[..., None]).squeeze(-1)


def masked_scores(model_fn, x, logits, *, mask_id, candidates):
    """p_theta(x_i | x with x_i masked) [b, s] for the `candidates` [b, s] (others: 0), one
    forward over a copy of each row per candidate position."""
    rows, cols = candidates.nonzero(as_tuple=True)
    scores = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if rows.numel() == 0:
        return scores
    copies = x[rows].clone()  # [n, s]
    copies[torch.arange(rows.numel(), device=x.device), cols] = mask_id
    probs = _probabilities(model_fn(copies), mask_id)  # [n, s, V]
    n = torch.arange(rows.numel(), device=x.device)
    scores[rows, cols] = probs[n, cols, x[rows, cols]]
    return scores


# (model_fn, x [b, s], this step's logits [b, s, V], mask_id, candidates [b, s]) -> [b, s]
SCORES: dict[str, Callable[..., torch.Tensor]] = {
    "visible": visible_scores,
    "masked": masked_scores,
}
# (loop step n = 1..N, N, tokens to decode M, per_step r) -> tokens re-masked at step n
BUDGETS: dict[str, Callable[[int, int, int, int], int]] = {
    "constant": lambda n, total, m, r: r,
    # ReMDM-style annealing: more re-masking early, none at the end
    "linear_decay": lambda n, total, m, r: math.ceil(r * (total - n + 1) / total),
}


@torch.no_grad()
def remask_decode(
    model_fn,
    x: torch.Tensor,
    *,
    mask_id: int,
    tokens_per_step: int,
    loop_steps: int,
    remask_per_step: int = 1,
    budget: str = "constant",
    score: str = "visible",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Parallel decoding of every mask of `x` [b, s] with budgeted re-masking -> tokens [b, s].

    1. Decode: `infill` commits `tokens_per_step` masks per call (temperature sampling).
    2. Loop, `loop_steps` steps of one forward each on the current sequence: the tokens masked
       at the step before are committed from it (drawn given everything else), and of the other
       committed tokens (never the context) the `budget` lowest-scoring ones are re-masked.
    3. One last forward commits what the last loop step re-masked.
    `stats` gets `remasked` [b] (tokens re-masked per row) and `calls` (model calls).
    """
    if score not in SCORES or budget not in BUDGETS:
        raise ValueError(
            f"score '{score}' / budget '{budget}': expected one of {', '.join(SCORES)} / "
            f"{', '.join(BUDGETS)}"
        )
    editable = x == mask_id  # [b, s]: never the context
    m = int(editable.sum(dim=1).max())
    counter = CallCounter(model_fn)
    x = infill(
        counter,
        x,
        tokens_per_step=tokens_per_step,
        mask_id=mask_id,
        temperature=temperature,
        generator=generator,
    )
    remasked = torch.zeros(x.shape[0], dtype=torch.long)
    for n in range(1, loop_steps + 2):
        masked = x == mask_id
        r = BUDGETS[budget](n, loop_steps, m, remask_per_step) if n <= loop_steps else 0
        if r == 0 and not bool(masked.any()):
            continue  # nothing to commit or re-mask: no call
        logits = counter(x).float()  # [b, s, V]
        _, drawn = draw(logits.clone(), mask_id, temperature, generator)
        candidates = editable & ~masked  # committed before this step
        again = torch.zeros_like(masked)
        if r > 0:
            scores = SCORES[score](counter, x, logits, mask_id=mask_id, candidates=candidates)
            k = candidates.sum(dim=1).clamp(max=r)  # [b]
            again = top_k_mask(-scores, candidates, k)  # the k lowest-scoring candidates
        x = torch.where(masked, drawn.to(x.dtype), x)
        x = torch.where(again, torch.full_like(x, mask_id), x)
        remasked += again.sum(dim=1).cpu()
    if stats is not None:
        stats["remasked"] = stats.get("remasked", 0) + remasked
        stats["calls"] = stats.get("calls", 0) + counter.calls
    return x


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
