"""Sequence energy trained by noise-contrastive estimation against the model's parallel samples."""

from __future__ import annotations

import torch

from pretrain.diffusion.auxiliary.base import (
    AuxiliaryLoss,
    sample_categorical,
    uniforms,
)


class EnergyNCE(AuxiliaryLoss):
    """A scalar energy E_theta(x) on the shared trunk (`pretrain.model.energy`), trained to tell
    data from parallel samples:

        x~ = x_t with every masked position drawn independently from p_theta(. | x_t) (no grad)
        L_nce = 1/B sum_b [ softplus(E(x0_b)) + softplus(-E(x~_b)) ]

    i.e. logistic regression with logit -E(x) for "x is data". The NCE gradient reaches the
    shared trunk, which is what makes the energy informative and also what can hurt the token
    model: on the multi-constraint task a weight of 1 cost most of the sequential validity and
    0.1 kept it (a stop-gradient into the trunk kept the token model intact but left the
    linear energy uninformative); see docs/joint_consistency.md. At the optimum
    -E(x) = log p_data(x) / q(x), q the parallel sampler, so exp(-E) is the importance weight
    that turns parallel candidates into samples of the data distribution: the k-candidate
    decoder (`pretrain.sampling.consistency.energy_resample`) resamples by it.
    Forwards: 1 no-grad sampling forward + the trunk on x0 and on x~ (one batch of 2B).
    """

    name = "energy_nce"
    extra_forwards = 3
    metrics = ("loss", "accuracy", "energy_gap")

    def __call__(self, view, batch, key):
        b, s = batch.inputs.shape
        with torch.no_grad():
            probs = torch.softmax(view.logits(batch.inputs), dim=-1)
            drawn = sample_categorical(probs, uniforms(key, "aux-nce-draw", (b, s), probs.device))
            noise = torch.where(batch.corrupted, drawn.to(batch.inputs.dtype), batch.inputs)
        clean = batch.clean_inputs
        energy = view.energy(torch.cat([clean, noise]), row=self.mask_id)  # [2b]
        data, fake = energy[:b], energy[b:]
        loss = (torch.nn.functional.softplus(data) + torch.nn.functional.softplus(-fake)).mean()
        # a draw identical to x0 (few masks, lucky draws) is neither data nor noise: not scored
        differs = (noise != clean).any(dim=1)
        correct = ((data < 0) & differs).sum() + ((fake > 0) & differs).sum()
        return loss, {
            "loss": loss.detach(),
            "accuracy": correct / (2 * differs.sum()).clamp(min=1),
            "energy_gap": ((fake - data) * differs).sum().detach() / differs.sum().clamp(min=1),
        }
