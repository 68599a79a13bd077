"""Monte-Carlo NELBO estimate of log p(continuation | context) for masked diffusion LMs.

The context stays clean; the n continuation tokens y are corrupted by the model's own forward
process. Each continuation position i has a masking time tau_i, independent across positions, with
P(tau_i <= t) = 1 - alpha_i(t) (the schedule's clock; alpha_i depends on i's distance from the
context for position-aware schedules). The continuous-time NELBO (docs/schedules.md) is then

    -log p(y | c) <= L = E_tau  sum_{k=1..n}  CE_{sigma(k)}(M_k),

where sigma sorts the positions by tau (masked first = generated last), M_k = {sigma(1..k)} is the
set masked by the time the k-th position is masked, and CE_i(M) = -log p_theta(y_i | c, y outside
M) is the model's cross-entropy at i with M masked: an any-order autoregressive factorisation whose
order distribution is the schedule's. We estimate it with one model forward per sample:

  * the level k ~ U{1..n} is stratified over the N samples of a request: k_s = floor(n v_s) + 1,
    v_s = (u + s / N) mod 1 with one u ~ U(0, 1) per request (antithetic, as in training);
  * the mask set is the first k positions of one draw of tau (tau_i = F_i^-1(u_i));
  * instead of the one token sigma(k), every token of M_k is scored with its posterior
    probability of being the k-th masked given M_k and t* = tau_sigma(k) (Rao-Blackwellisation):
        P(sigma(k) = i | M_k, t*) = w_i(t*) / sum_{j in M_k} w_j(t*),
    with w_i(t) = -alpha_i'(t) / (1 - alpha_i(t)) the schedule's own NELBO weight;
  * sample value X_s = n * sum_{i in M_k} P(sigma(k) = i | M_k, t*) CE_i(M_k).

So E[X_s] = L exactly (eps = 0: the bound itself, not the training window), the weights of every
sample sum to n (a uniform predictor scores exactly n log(V - 1), with zero variance), and no
weight exceeds n (finite variance, unlike the 1/t estimator near t = 0). For shared schedules
(`linear`, `cosine`, `loglinear`) the order is uniform and the weights are n / k: LLaDA's estimator.
`distance` weights position i by its exponent k_i; `block` gives the whole weight to the masked
tokens of the block being masked at t*. Block *diffusion* (`diffusion.objective: block`) sums one
such estimate per block of the sequence (each block's own clock, the blocks before it clean).

Randomness comes from a generator keyed by the seed, the context's token ids and the continuation's
length: an estimate does not depend on batch size, request order or the number of processes, and
equally long choices after one context are scored on the same masks (common random numbers).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.diffusion.schedules import NoiseSchedule

BISECTION_STEPS = 60
"""Inverting a position-aware clock to float64 resolution (2^-60 of [0, 1])."""


def request_generator(seed: int, context: Sequence[int], length: int) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, context ids, continuation length): a request
    draws the same masks wherever and whenever it is scored, and the choices of one question
    (same context, same length) share theirs: common random numbers, so the noise of the
    estimates largely cancels in the difference between choices, which decides the answer."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"dlm-eval/{seed}/{length}/".encode())
    digest.update(np.asarray(context, dtype=np.int64).tobytes())
    value = int.from_bytes(digest.digest(), "little") & (2**63 - 1)
    return torch.Generator().manual_seed(value)


@dataclass
class RequestPlan:
    """The model inputs of one request: row r hides (and scores) `masked[r]` of the continuation.

    Rows 0..samples-1 are Monte-Carlo samples; a last row with every position masked (when
    `greedy_row`) only decides `is_greedy`. An exact plan (`ar`) has one row scoring every
    position with weight 1, which is both the log-likelihood and the greedy check.
    """

    masked: torch.Tensor
    """bool [rows, n]."""
    weights: torch.Tensor
    """float64 [rows, n]: weight of each scored position (0 off the mask and in the greedy row)."""
    samples: int
    levels: torch.Tensor
    """float64 [samples]: each sample's stratification level v_s."""
    strata: int = 1
    """Levels k the samples spread over (the standard error's groups: `combine`)."""
    exact: bool = False

    @property
    def greedy_row(self) -> int:
        return self.masked.shape[0] - 1


def stratified_levels(samples: int, gen: torch.Generator) -> torch.Tensor:
    """v_s = (u + s / N) mod 1, s = 0..N-1: one stratum of width 1/N per sample."""
    u = torch.rand(1, generator=gen, dtype=torch.float64)
    return torch.remainder(u + torch.arange(samples, dtype=torch.float64) / samples, 1.0)


def masking_times(schedule: NoiseSchedule, u: torch.Tensor, distance: torch.Tensor):
    """tau [N, n] with P(tau_i <= t) = (1 - alpha_i(t)) / (1 - alpha_i(1)) for u [N, n].

    Shared clocks give every position the same monotone map of u, so the order (all that matters
    for them) is u's own. Position-aware clocks are inverted by bisection on the schedule's alpha.
    The division by 1 - alpha_i(1) conditions on being masked by t = 1 (`loglinear` leaves a
    1e-3 share clean there), as the training loss's window normaliser does.
    """
    if not schedule.position_aware:
        return u
    d = distance.expand_as(u)
    top = 1.0 - schedule.alpha(torch.ones_like(u), d)
    target = u * top
    lo, hi = torch.zeros_like(u), torch.ones_like(u)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        below = (1.0 - schedule.alpha(mid, d)) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def order_weights(schedule: NoiseSchedule, masked, t_star, distance) -> torch.Tensor:
    """P(i was masked last | M, t*) [N, n] = w_i(t*) / sum_{j in M} w_j(t*), 0 outside M.

    Falls back to uniform over M where the weights vanish (t* exactly on a block boundary, a
    probability-zero event that floating point can still produce)."""
    if not schedule.position_aware:
        share = masked.double()
    else:
        w = schedule.weight(t_star[:, None], distance.expand(masked.shape))
        share = torch.where(masked & torch.isfinite(w), w.double(), 0.0)
        empty = share.sum(dim=1, keepdim=True) <= 0
        share = torch.where(empty, masked.double(), share)
    return share / share.sum(dim=1, keepdim=True)


def masked_plan(
    schedule: NoiseSchedule, n: int, samples: int, gen: torch.Generator, *, greedy_row: bool
) -> RequestPlan:
    """The Monte-Carlo plan of an n-token continuation after a clean context (module docstring).

    Distances from the context are 0..n-1, as `context_distance` measures them in training."""
    distance = torch.arange(n, dtype=torch.float64)[None]  # [1, n]
    levels = stratified_levels(samples, gen)
    k = (levels * n).floor().long().clamp(max=n - 1) + 1  # [N] in 1..n
    tau = masking_times(
        schedule, torch.rand(samples, n, generator=gen, dtype=torch.float64), distance
    )
    order = tau.argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(samples, n))
    masked = rank < k[:, None]  # the first k positions of the masking order
    t_star = tau.gather(1, order.gather(1, (k - 1)[:, None]))[:, 0]  # when the k-th was masked
    weights = n * order_weights(schedule, masked, t_star, distance)
    return _with_greedy_row(masked, weights, levels, n, greedy_row)


def block_plan(
    context_len: int, n: int, block: int, samples: int, gen: torch.Generator, *, greedy_row: bool
) -> RequestPlan:
    """Block diffusion: blocks of `block` positions counted from position 0 of context +
    continuation; each block's continuation positions get their own stratified level and a uniform
    random mask of that size (the block objective's shared schedule), weighted n_b / k_b."""
    position = context_len + torch.arange(n)
    ids = position // block
    masked = torch.zeros(samples, n, dtype=torch.bool)
    weights = torch.zeros(samples, n, dtype=torch.float64)
    first_levels, strata = None, 1
    for b in ids.unique().tolist():
        cols = (ids == b).nonzero()[:, 0]
        n_b = cols.numel()
        strata = max(strata, n_b)
        levels = stratified_levels(samples, gen)
        first_levels = levels if first_levels is None else first_levels
        k = (levels * n_b).floor().long().clamp(max=n_b - 1) + 1
        u = torch.rand(samples, n_b, generator=gen, dtype=torch.float64)
        rank = u.argsort(dim=1).argsort(dim=1)
        hidden = rank < k[:, None]
        masked[:, cols] = hidden
        weights[:, cols] = torch.where(hidden, n_b / k[:, None].double(), 0.0)
    return _with_greedy_row(masked, weights, first_levels, strata, greedy_row)


def exact_plan(n: int) -> RequestPlan:
    """One row scoring every position with weight 1: an exact (causal) log-likelihood."""
    ones = torch.ones(1, n, dtype=torch.bool)
    return RequestPlan(ones, ones.double(), samples=1, levels=torch.zeros(1), exact=True)


def _with_greedy_row(masked, weights, levels, strata: int, greedy_row: bool) -> RequestPlan:
    samples, n = masked.shape
    if greedy_row:
        masked = torch.cat([masked, torch.ones(1, n, dtype=torch.bool)])
        weights = torch.cat([weights, torch.zeros(1, n, dtype=torch.float64)])
    return RequestPlan(masked, weights, samples=samples, levels=levels, strata=strata)


def combine(values: torch.Tensor, levels: torch.Tensor, strata: int) -> tuple[float, float]:
    """Sample values X_s [N] (weighted CE sums) -> (log-likelihood estimate, standard error).

    The estimate is -mean(X). The standard error is that of a stratified sample: the samples,
    ordered by level, form G groups of consecutive levels (G = the number of levels k, or N / 2
    groups of two when there are fewer samples than twice that), and
        var(mean) = sum_g N_g s_g^2 / N^2,   s_g^2 the sample variance within group g.
    It measures the noise left inside the strata; the naive std / sqrt(N) would also count the
    differences between levels, which the stratification removes. Groups that merge several
    levels (few samples, block diffusion's several clocks) make it slightly conservative.
    """
    x = values.double()
    n = x.numel()
    mean = float(x.mean())
    if n < 2:
        return -mean, math.nan
    groups = torch.tensor_split(x[levels.argsort()], max(1, min(strata, n // 2)))
    var = sum(g.numel() * float(g.var(unbiased=True)) for g in groups) / n**2
    return -mean, math.sqrt(var)
