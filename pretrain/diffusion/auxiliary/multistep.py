"""Multi-step consistency: the model's one-step prediction distilled towards its own multi-step
rollout from the same x_t."""

from __future__ import annotations

import torch

from pretrain.diffusion.auxiliary.base import (
    AuxiliaryLoss,
    sample_categorical,
    uniforms,
)


class MultiStepConsistency(AuxiliaryLoss):
    """KL from the one-step prediction to the (stop-gradient) n-step prediction from one x_t.

    One step: every masked position of x_t is drawn in parallel, d_i ~ p_theta(. | x_t), and the
    model re-predicts every position from that draft: p_theta(. | d).
    n steps (no gradient, n = `rollout_steps`): the masked positions are split uniformly at
    random into groups G_1..G_n; G_1 commits the same draws d (the rollout shares its first step
    with the one-step draft), and G_k (k >= 2) is drawn from p_theta(. | x_t + commits of G_<k).
    Its prediction q_i is one-hot(d_i) on G_1, p_theta(. | x_t + G_<k) on G_k, and one-hot(x0_i)
    on visible positions. Then

        L_ms = 1/(B L) sum_i KL(q_i || p_theta(. | d))

    A token that the rollout would have drawn differently given its neighbours (a disagreeing
    pair) gets low probability under p_theta(. | d), which is the score the re-masking decoder
    uses. Targets come from the model itself, not from x0 (a self-distillation: stop-gradient,
    no EMA copy of the weights). Forwards: 1 draft + (n - 1) rollout + 1 with gradient.
    """

    name = "multistep_consistency"
    metrics = ("loss", "rollout_change_fraction")

    @property
    def extra_forwards(self) -> int:  # type: ignore[override]
        return self.cfg.rollout_steps + 1

    def __call__(self, view, batch, key):
        b, s = batch.inputs.shape
        n = self.cfg.rollout_steps
        device = batch.inputs.device
        corrupted = batch.corrupted  # [b, s] input positions holding the mask
        with torch.no_grad():
            probs = torch.softmax(view.logits(batch.inputs), dim=-1)  # [b, s, V]
            draft = torch.where(
                corrupted,
                sample_categorical(probs, uniforms(key, "aux-ms-draw", (b, s), device)),
                batch.inputs,
            )
            group = (uniforms(key, "aux-ms-group", (b, s), device) * n).long()  # [b, s] in [0, n)
            target = torch.nn.functional.one_hot(draft, probs.shape[-1]).float()  # [b, s, V]
            x = torch.where(corrupted & (group == 0), draft, batch.inputs)
            for k in range(1, n):
                probs = torch.softmax(view.logits(x), dim=-1)
                now = corrupted & (group == k)
                target = torch.where(now[..., None], probs, target)
                drawn = sample_categorical(probs, uniforms(key, f"aux-ms-roll{k}", (b, s), device))
                x = torch.where(now, drawn, x)
            changed = (corrupted & (x != draft)).sum() / (b * s)
        logp = torch.log_softmax(view.logits(draft), dim=-1)  # [b, s, V], with gradient
        # q log q - q log p, with 0 log 0 = 0 (the mask token and off-support ids)
        kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - logp), 0.0)
        loss = kl.sum() / (b * s)
        return loss, {"loss": loss.detach(), "rollout_change_fraction": changed}
