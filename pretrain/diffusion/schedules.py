"""Noise schedules of absorbing-state (masked) diffusion, shared or per position.

A schedule gives every position i the probability `alpha_i(t)` that its token is still clean at
time t in [0, 1], with alpha_i(0) = 1 (data) and alpha_i(1) ~ 0 (all masked). The continuous-time
NELBO (docs/design.md §3-4) is

    L = E_t E_q  sum_i 1[x_t^i = m] * w_i(t) * (-log p(x0_i | x_t)),
    w_i(t) = -alpha_i'(t) / (1 - alpha_i(t)).

Training draws t ~ U(eps, 1) because w blows up at t -> 0. That window carries a mass of
`alpha_i(eps) - alpha_i(1)` of position i's masking events, so each schedule also reports the
window normalisation

    Z_i(eps) = (1 - eps) / (alpha_i(eps) - alpha_i(1)),

and the loss uses Z_i * w_i(t). With it, E_t E_q[1[masked] Z_i w_i(t)] = 1 exactly for every
position of every NELBO schedule, so a model predicting the uniform distribution over V tokens
has expected loss exactly L * log V (the exact check in the tests). For `linear`, Z = 1 and
Z * w = 1/t: LLaDA's estimator.

Position-aware schedules read `distance` [b, s]: how many tokens lie between position i and the
visible context before it (0 right after a clean prefix / prompt; the position itself when there is
none). As long as alpha_i does not depend on the tokens, the loss stays a valid NELBO with
per-position weights; it equals an any-order AR model whose order the schedule controls (positions
masked earlier are generated later). Content-dependent schedules (`frequency`) are surrogates:
`is_nelbo = False`, and their loss is never a likelihood bound.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from pretrain.errors import ConfigError

SCHEDULES: dict[str, type[NoiseSchedule]] = {}


def register_schedule(cls: type[NoiseSchedule]) -> type[NoiseSchedule]:
    SCHEDULES[cls.name] = cls
    return cls


def build_schedule(name: str, cfg=None, *, horizon: int = 128) -> NoiseSchedule:
    """The schedule `name`; `cfg` (a DiffusionConfig) supplies its knobs, `horizon` the sequence
    length that distances are measured against."""
    if name not in SCHEDULES:
        raise ConfigError(
            f"diffusion.schedule: unknown schedule '{name}' "
            f"(expected one of: {', '.join(SCHEDULES)})"
        )
    cls = SCHEDULES[name]
    return cls.from_config(cfg, horizon) if cfg is not None else cls(horizon=horizon)


class NoiseSchedule(ABC):
    name: ClassVar[str]
    is_nelbo: ClassVar[bool] = True
    """True: the weighted loss is a valid NELBO (content-independent alpha); False: a surrogate."""
    position_aware: ClassVar[bool] = False
    """True when alpha depends on the distance to the visible context."""

    def __init__(self, *, horizon: int = 128):
        self.horizon = horizon

    @classmethod
    def from_config(cls, cfg, horizon: int) -> NoiseSchedule:
        return cls(horizon=horizon)

    # t broadcasts against distance / x0 ([b, 1] against [b, s]); shared schedules ignore both.
    @abstractmethod
    def alpha(self, t: torch.Tensor, distance=None, x0=None) -> torch.Tensor:
        """Probability that a token is unmasked at time t."""

    @abstractmethod
    def alpha_prime(self, t: torch.Tensor, distance=None, x0=None) -> torch.Tensor:
        """d alpha / dt (<= 0)."""

    def weight(self, t: torch.Tensor, distance=None, x0=None) -> torch.Tensor:
        """w_i(t) = -alpha_i'(t) / (1 - alpha_i(t)): the NELBO weight of a masked token."""
        return -self.alpha_prime(t, distance, x0) / (1.0 - self.alpha(t, distance, x0))

    def window_normalizer(self, eps: float, distance=None, x0=None):
        """Z_i(eps) = (1 - eps) / (alpha_i(eps) - alpha_i(1)) for t ~ U(eps, 1); a float for
        shared schedules, a tensor shaped like `distance` / `x0` otherwise."""
        if distance is None and x0 is None:
            ends = self.alpha(torch.tensor([eps, 1.0], dtype=torch.float64))
            return (1.0 - eps) / float(ends[0] - ends[1])
        like = distance if distance is not None else x0
        lo = torch.full(like.shape, eps, dtype=torch.float64, device=like.device)
        hi = torch.ones_like(lo)
        return (1.0 - eps) / (self.alpha(lo, distance, x0) - self.alpha(hi, distance, x0))

    def loss_weight(self, t, eps: float, distance=None, x0=None) -> torch.Tensor:
        """Z_i(eps) * w_i(t): what a masked token's CE is multiplied by."""
        return self.window_normalizer(eps, distance, x0) * self.weight(t, distance, x0)

    def position_alpha(self, t: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """alpha_i(t) for t [b] and distance [b, s] -> [b, s] (what a sampler orders by)."""
        return self.alpha(t[:, None].double(), distance.double()).expand(distance.shape)


@register_schedule
class LinearSchedule(NoiseSchedule):
    """alpha(t) = 1 - t,  w(t) = 1/t  (LLaDA, SMDM, MDLM's log-linear noise)."""

    name = "linear"

    def alpha(self, t, distance=None, x0=None):
        return 1.0 - t

    def alpha_prime(self, t, distance=None, x0=None):
        return -torch.ones_like(t)

    def weight(self, t, distance=None, x0=None):
        return 1.0 / t


@register_schedule
class CosineSchedule(NoiseSchedule):
    """alpha(t) = cos(pi t / 2),  w(t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)).

    Masks slowly at first (alpha'(0) = 0), so more of the training signal sits at high noise.
    """

    name = "cosine"

    def alpha(self, t, distance=None, x0=None):
        return torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t, distance=None, x0=None):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


@register_schedule
class LogLinearSchedule(NoiseSchedule):
    """MDLM's log-linear noise: total noise sigma(t) = -log(1 - (1 - delta) t), alpha = e^-sigma.

    alpha(t) = 1 - (1 - delta) t,  w(t) = (1 - delta) / ((1 - delta) t) = 1/t,  alpha(1) = delta.
    The same weights as `linear`, with a delta = 1e-3 share of tokens left clean at t = 1 (as in
    MDLM): kept so MDLM configs port one to one; Z(eps) accounts for alpha(1) != 0.
    """

    name = "loglinear"
    delta: float = 1e-3

    def alpha(self, t, distance=None, x0=None):
        return 1.0 - (1.0 - self.delta) * t

    def alpha_prime(self, t, distance=None, x0=None):
        return torch.full_like(t, -(1.0 - self.delta))


def _power(t, k):
    """t^k and its t-derivative k t^(k-1), for the power-law clocks below."""
    tk = t**k
    return tk, k * tk / t


class PowerLawSchedule(NoiseSchedule):
    """alpha_i(t) = 1 - t^{k_i}: the per-position clock shared by `distance` and `frequency`,
    which differ only in the exponent k_i (of strength gamma = `diffusion.distance_strength`)."""

    def __init__(self, *, horizon: int = 128, strength: float = 2.0):
        super().__init__(horizon=horizon)
        self.strength = strength

    @classmethod
    def from_config(cls, cfg, horizon):
        return cls(horizon=horizon, strength=cfg.distance_strength)

    def exponent(self, distance, x0):
        """k_i, broadcastable to [b, s] (a scalar where it is the same everywhere)."""
        raise NotImplementedError

    def alpha(self, t, distance=None, x0=None):
        return 1.0 - _power(t, self.exponent(distance, x0))[0]

    def alpha_prime(self, t, distance=None, x0=None):
        return -_power(t, self.exponent(distance, x0))[1]


@register_schedule
class DistanceSchedule(PowerLawSchedule):
    """alpha_i(t) = 1 - t^{k_i},  w_i(t) = k_i / t,  k_i = exp(gamma * (1/2 - min(d_i / D, 1))).

    d_i is the distance from the visible context, D the horizon (sequence length). Far positions
    have k_i < 1 and are masked early (generated late), near ones k_i > 1; the geometric mean of
    k over [0, D] is 1, so the overall mask rate stays that of `linear`. The knob gamma
    (`diffusion.distance_strength`) interpolates from uniform (gamma = 0: k = 1, the linear
    schedule) towards left-to-right generation (gamma -> inf). Content-independent: a NELBO.
    """

    name = "distance"
    position_aware = True

    def exponent(self, distance, x0):
        if distance is None:
            return 1.0
        return torch.exp(self.strength * (0.5 - (distance / self.horizon).clamp(0.0, 1.0)))

    def weight(self, t, distance=None, x0=None):
        return self.exponent(distance, x0) / t


@register_schedule
class BlockSchedule(NoiseSchedule):
    """Per-block clocks: a staircase of linear ramps, the far blocks masked first.

    Block j = floor(d_i / B) of n = ceil(D / B) blocks has local time
    tau_j(t) = clip(n t - (n - 1 - j), 0, 1), alpha_i = 1 - tau_j, and w_i = n / tau_j on its ramp
    (0 once the block is fully masked: its NELBO term was paid on the ramp). So the block nearest
    the context is denoised last in the forward process, i.e. generated first: block diffusion's
    semi-autoregressive order within one masked-diffusion NELBO. B = `diffusion.block_length`.
    """

    name = "block"
    position_aware = True

    def __init__(self, *, horizon: int = 128, block_length: int = 16):
        super().__init__(horizon=horizon)
        self.block_length = block_length
        self.blocks = max(1, math.ceil(horizon / block_length))

    @classmethod
    def from_config(cls, cfg, horizon):
        return cls(horizon=horizon, block_length=cfg.block_length)

    def _tau(self, t, distance):
        n = self.blocks
        if distance is None:  # no context: one ramp over the whole interval
            return t, torch.ones_like(t)
        j = (distance // self.block_length).clamp(max=n - 1)
        raw = n * t - (n - 1 - j)
        ramp = (raw > 0) & (raw < 1)
        return raw.clamp(0.0, 1.0), torch.where(ramp, float(n), 0.0)

    def alpha(self, t, distance=None, x0=None):
        return 1.0 - self._tau(t, distance)[0]

    def alpha_prime(self, t, distance=None, x0=None):
        return -self._tau(t, distance)[1]

    def weight(self, t, distance=None, x0=None):
        tau, slope = self._tau(t, distance)
        return torch.where(slope > 0, slope / tau.clamp(min=1e-12), 0.0)


def in_sequence_counts(x0: torch.Tensor) -> torch.Tensor:
    """[b, s]: how often x0[r, i] occurs in row r. On the host (where the trainer corrupts) by
    sorting each row, O(s log s); on a GPU by the [b, s, s] comparison, which needs no sync."""
    if x0.device.type != "cpu":
        return (x0[:, :, None] == x0[:, None, :]).sum(-1)
    rows = []
    for row in x0:
        _, inverse, counts = torch.unique(row, return_inverse=True, return_counts=True)
        rows.append(counts[inverse])
    return torch.stack(rows)


@register_schedule
class FrequencySurrogate(PowerLawSchedule):
    """SURROGATE (not a NELBO): content-dependent masking by in-sequence token frequency.

    alpha_i(t) = 1 - t^{k_i},  k_i = exp(gamma * (f_i - 1/2)),  loss weight 1/t (linear's),
    with f_i in [0, 1] the count of token x0_i in its sequence over the largest count there. Tokens
    that recur (less informative) are masked later, rare ones earlier, and the loss keeps the
    MDLM 1/t weighting instead of its own -alpha'/(1-alpha). Because alpha depends on x0, the mask
    pattern leaks content and the weights no longer integrate to 1: a uniform predictor does NOT
    score L * log V (the tests show it). Use it as a training signal, never report it as a bound.
    """

    name = "frequency"
    is_nelbo = False

    def exponent(self, distance, x0):
        if x0 is None:
            return 1.0
        counts = in_sequence_counts(x0).double()  # [b, s]: count of x0_i in its row
        share = counts / counts.amax(dim=1, keepdim=True)
        return torch.exp(self.strength * (share - 0.5))

    def weight(self, t, distance=None, x0=None):
        return 1.0 / t

    def window_normalizer(self, eps, distance=None, x0=None):
        return 1.0  # the surrogate keeps linear's weighting as is
