"""Noise schedules of absorbing-state (masked) diffusion.

A schedule is the probability `alpha(t)` that a token is still clean at time t in [0, 1], with
alpha(0) = 1 (data) and alpha(1) ~ 0 (all masked). The continuous-time NELBO (DESIGN.md sec. 3) is

    L = E_t E_q  sum_i 1[x_t^i = m] * w(t) * (-log p(x0_i | x_t)),
    w(t) = -alpha'(t) / (1 - alpha(t)).

Training draws t ~ U(eps, 1) because w(t) blows up at t -> 0. That window carries a mass of
`alpha(eps) - alpha(1)` of the masking events, so each schedule also reports the window
normalisation

    Z(eps) = (1 - eps) / (alpha(eps) - alpha(1)),

and the loss uses Z * w(t). With it, E_t E_q[1[masked] Z w(t)] = 1 exactly for every schedule, so a
model predicting the uniform distribution over V tokens has expected loss exactly L * log V (the
exact check in the tests). For `linear`, Z = 1 and Z * w = 1/t: LLaDA's estimator.

Schedules here are shared by all positions; position-aware ones add a position axis to `alpha`.
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


def build_schedule(name: str) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ConfigError(
            f"diffusion.schedule: unknown schedule '{name}' "
            f"(expected one of: {', '.join(SCHEDULES)})"
        )
    return SCHEDULES[name]()


class NoiseSchedule(ABC):
    name: ClassVar[str]
    is_nelbo: ClassVar[bool] = True
    """True: the weighted loss is a valid NELBO (content-independent alpha); False: a surrogate."""

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is unmasked at time t."""

    @abstractmethod
    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt (<= 0)."""

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = -alpha'(t) / (1 - alpha(t)): the NELBO weight of a masked token at time t."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))

    def window_normalizer(self, eps: float) -> float:
        """Z(eps) = (1 - eps) / (alpha(eps) - alpha(1)) for t ~ U(eps, 1)."""
        ends = self.alpha(torch.tensor([eps, 1.0], dtype=torch.float64))
        return (1.0 - eps) / float(ends[0] - ends[1])


@register_schedule
class LinearSchedule(NoiseSchedule):
    """alpha(t) = 1 - t,  w(t) = 1/t  (LLaDA, SMDM, MDLM's log-linear noise)."""

    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def weight(self, t):
        return 1.0 / t


@register_schedule
class CosineSchedule(NoiseSchedule):
    """alpha(t) = cos(pi t / 2),  w(t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)).

    Masks slowly at first (alpha'(0) = 0), so more of the training signal sits at high noise.
    """

    name = "cosine"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t):
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

    def alpha(self, t):
        return 1.0 - (1.0 - self.delta) * t

    def alpha_prime(self, t):
        return torch.full_like(t, -(1.0 - self.delta))
