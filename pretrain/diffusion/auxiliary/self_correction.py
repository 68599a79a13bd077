"""Self-correction: train the model to recognise and fix its own parallel commits."""

from __future__ import annotations

import torch

from pretrain.diffusion.auxiliary.base import (
    AuxiliaryLoss,
    sample_categorical,
    uniforms,
)


class SelfCorrection(AuxiliaryLoss):
    """Denoise a draft that holds the model's own parallel samples:

        x~ = x_t with a fraction rho of its masked positions replaced by y_i ~ p_theta(. | x_t)
             (independent draws, no gradient: exactly what one parallel decoding step commits)
        L_sc = 1/(B L) sum_i -log p_theta(x0_i | x~)    (every position; docs/design.md §6)

    A committed token that disagrees with the rest of the sequence ("she like") is a sampled
    position whose target differs from it, so the trained model gives it low probability
    p_theta(x~_i | x~): the re-masking decoder (`pretrain.sampling.consistency`) re-masks such
    tokens and decodes them again. Training on the visible positions too teaches the model that
    a committed token is usually right, which makes that probability a usable score.
    """

    name = "self_correction"
    extra_forwards = 2  # the no-grad sampling forward and the forward on the draft
    metrics = ("loss", "ce_filled_per_token_slot", "filled_fraction", "sample_error_fraction")

    def __call__(self, view, batch, key):
        b, s = batch.inputs.shape
        with torch.no_grad():
            probs = torch.softmax(view.logits(batch.inputs), dim=-1)  # [b, s, V]
        drawn = sample_categorical(probs, uniforms(key, "aux-sc-draw", (b, s), probs.device))
        fill = batch.corrupted & (
            uniforms(key, "aux-sc-fill", (b, s), probs.device) < self.cfg.fill_fraction
        )
        draft = torch.where(fill, drawn.to(batch.inputs.dtype), batch.inputs)
        ce = view.ce(draft, batch.targets)  # [b, s]
        slots = b * s
        loss = ce.sum() / slots
        return loss, {
            "loss": loss.detach(),
            "ce_filled_per_token_slot": torch.where(fill, ce, 0.0).sum().detach() / slots,
            "filled_fraction": fill.sum() / slots,
            "sample_error_fraction": (fill & (draft != batch.clean_inputs)).sum() / slots,
        }
