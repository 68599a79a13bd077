"""Training objectives. An objective turns clean tokens into a model input plus per-token loss
weights (`prepare`), and per-token cross-entropies into a scalar loss (`loss`).

Splitting it this way keeps the objective ignorant of the parallel layout: the corruption runs
before the model (identically on every rank of a replica), and the loss is a weighted sum of the
per-token CE the model's last stage produces, whatever the pipeline or tensor layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pretrain.config import DiffusionConfig
from pretrain.diffusion.corruption import CorruptionKey, mask_tokens, sample_times
from pretrain.diffusion.schedules import NoiseSchedule, build_schedule
from pretrain.errors import ConfigError


@dataclass
class DiffusionBatch:
    inputs: torch.Tensor
    """x_t [b, s]: the model input."""
    targets: torch.Tensor
    """x0 [b, s]: what the model predicts."""
    loss_weights: torch.Tensor
    """[b, s] fp32: 1[x_t = m] * Z * w(t); zero wherever the token is visible (never a target)."""
    masked: torch.Tensor
    """[b, s] bool."""
    t: torch.Tensor
    """[b]: diffusion time per sequence."""
    attention_mask: torch.Tensor | None = None
    """None (bidirectional) or bool [b|1, 1, s, s], True = may attend."""


# Explicit normalisation (DESIGN.md sec. 3): the metric name says which one produced the loss.
NORMALIZATIONS: dict[str, tuple[str, Callable[[torch.Tensor, DiffusionBatch], torch.Tensor]]] = {
    # sum over masked tokens / (B * L): an unbiased per-token NELBO estimate (LLaDA pretraining)
    "token_slot": ("nelbo_per_token_slot", lambda s, b: s / b.targets.numel()),
    # sum over masked tokens / number masked: lower variance, biased towards high-t sequences
    "masked_token": (
        "weighted_ce_per_masked_token",
        lambda s, b: s / b.masked.sum().clamp(min=1),
    ),
}


class MaskedDiffusion:
    """Masked (absorbing-state) diffusion, the LLaDA/MDLM objective:

        L = E_{t~U(eps,1)} E_q  sum_i 1[x_t^i = m] * Z * w(t) * (-log p_theta(x0_i | x_t))

    divided by B*L token slots (`token_slot`) or by the number of masked tokens (`masked_token`).
    """

    name = "masked"

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        mask_id: int,
        eps: float,
        antithetic: bool,
        normalization: str,
    ):
        self.schedule = schedule
        self.mask_id = mask_id
        self.eps = eps
        self.antithetic = antithetic
        self.z = schedule.window_normalizer(eps)
        self.metric_name, self._normalize = NORMALIZATIONS[normalization]
        # Every key `loss` reports, plus the loss itself, in a fixed order for reductions. All are
        # means over token slots, so micro-batches and replicas (equal slot counts) average
        # exactly; ratios such as `ce_masked` are derived afterwards by `summarize`.
        self.metric_names = tuple(
            dict.fromkeys(
                [
                    "loss",
                    self.metric_name,
                    "nelbo_per_token_slot",
                    "masked_ce_per_token_slot",
                    "masked_fraction",
                ]
            )
        )

    def prepare(self, x0: torch.Tensor, key: CorruptionKey) -> DiffusionBatch:
        """Corrupt a training micro-batch x0 [b, s] at the times the key assigns it."""
        t = sample_times(x0.shape[0], key, eps=self.eps, antithetic=self.antithetic)
        return self._corrupt(x0, t, key.row_generators(x0.shape[0], "mask"))

    def prepare_eval(self, x0: torch.Tensor, key: CorruptionKey) -> DiffusionBatch:
        """Validation corruption: a fixed t-grid over the whole validation set and fixed masks.

        `key.micro` is the validation batch index and `key.micro_batches` their number, so the
        j-th of the N validation sequences (over all replicas) gets t_j = eps + (1-eps)(j + 1/2)/N:
        a midpoint rule over [eps, 1], identical at every evaluation and for every layout.
        """
        b = x0.shape[0]
        j = torch.arange(b, dtype=torch.float64) + key.offset(b)
        t = (self.eps + (1.0 - self.eps) * (j + 0.5) / key.total(b)).float()
        return self._corrupt(x0, t, key.row_generators(b, "eval-mask"))

    def _corrupt(self, x0, t, generators) -> DiffusionBatch:
        alpha = self.schedule.alpha(t)[:, None]  # [b, 1]
        x_t, masked = mask_tokens(x0, alpha, self.mask_id, generators)
        weight = (self.z * self.schedule.weight(t))[:, None].to(x0.device)  # [b, 1]
        loss_weights = masked.float() * weight
        return DiffusionBatch(x_t, x0, loss_weights, masked, t.to(x0.device))

    def loss(self, ce: torch.Tensor, batch: DiffusionBatch) -> tuple[torch.Tensor, dict]:
        """ce [b, s] fp32 -> (scalar loss, detached metrics).

        Visible positions have weight 0, and CE there is replaced by 0 before weighting so that a
        non-finite CE at a visible position can never leak into the loss.
        """
        weighted = torch.where(batch.masked, ce * batch.loss_weights, 0.0).sum()
        loss = self._normalize(weighted, batch)
        slots = batch.targets.numel()
        metrics = {
            self.metric_name: loss.detach(),
            "nelbo_per_token_slot": (weighted / slots).detach(),
            "masked_ce_per_token_slot": (torch.where(batch.masked, ce, 0.0).sum() / slots).detach(),
            "masked_fraction": (batch.masked.sum() / slots).detach(),
        }
        return loss, metrics

    @staticmethod
    def summarize(means: dict[str, float]) -> dict[str, float]:
        """Add ratios to averaged metrics: `ce_masked`, the mean CE per masked token."""
        out = dict(means)
        out["ce_masked"] = means["masked_ce_per_token_slot"] / max(means["masked_fraction"], 1e-12)
        return out


OBJECTIVES = {"masked": MaskedDiffusion}


def build_objective(cfg: DiffusionConfig, *, mask_id: int) -> MaskedDiffusion:
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(
            f"diffusion.objective: unknown objective '{cfg.objective}' "
            f"(expected one of: {', '.join(OBJECTIVES)})"
        )
    return OBJECTIVES[cfg.objective](
        build_schedule(cfg.schedule),
        mask_id=mask_id,
        eps=cfg.eps,
        antithetic=cfg.antithetic,
        normalization=cfg.loss_normalization,
    )
