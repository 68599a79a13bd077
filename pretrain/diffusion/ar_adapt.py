"""Causal LM training and AR -> DLM adaptation (DiffuLLaMA / Dream style).

`ar`: next-token prediction with a causal mask, L = sum_{i<L-1} -log p(x0_{i+1} | x0_{<=i}),
reported per token slot under the same metric names as the masked objective (the NLL per slot is
what `nelbo_per_token_slot` means for an exact likelihood). Trains the causal checkpoints that
`ar_adapt` starts from (`train.init_from`).

`ar_adapt`: the masked-diffusion NELBO of `MaskedDiffusion`, with two changes that let a causal
model keep what it knows:
  * the one-token shift (`diffusion.shift`): hidden state i predicts token i+1, as it did under
    AR training. Target i is x0_{i+1}, weighted by 1[x_t^{i+1} = m] Z w(t); token 0 stays clean.
  * attention-mask annealing over K = `diffusion.anneal_steps` steps: at step s a fixed random
    share f(s) = min(1, s / K) of the non-causal pairs (j > i) is allowed on top of the causal
    mask. The allowed set only grows (pair (i, j) opens once f passes its fixed uniform u_ij), so
    the model sees one smooth path from causal (f = 0) to bidirectional (f = 1, mask dropped).
"""

from __future__ import annotations

import torch

from pretrain.diffusion.corruption import CorruptionKey, derived_generator
from pretrain.diffusion.masks import causal_mask
from pretrain.diffusion.objective import DiffusionBatch, MaskedDiffusion
from pretrain.diffusion.schedules import build_schedule


def _shift_left(x: torch.Tensor, fill) -> torch.Tensor:
    """x [b, s] -> [b, s] with y_i = x_{i+1} and y_{s-1} = fill."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], dim=1)


def _shift_right(logits: torch.Tensor) -> torch.Tensor:
    """out_i = logits_{i-1}: hidden state i-1 predicts token i (position 0 keeps its own; it is
    always part of the prompt)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


class CausalLM(MaskedDiffusion):
    """Next-token prediction under a causal mask (the AR baseline and the adaptation start)."""

    name = "ar"

    @classmethod
    def from_config(cls, cfg, *, mask_id, seq_len):
        return cls(
            build_schedule("linear"),
            mask_id=mask_id,
            eps=cfg.eps,
            antithetic=cfg.antithetic,
            normalization=cfg.loss_normalization,
        )

    def prepare(self, x0, key, loss_mask=None, x0_host=None) -> DiffusionBatch:
        del x0_host  # nothing is sampled: every next token is a target
        b, s = x0.shape
        targets = _shift_left(x0, 0)
        eligible = torch.ones_like(x0, dtype=torch.bool)
        eligible[:, -1] = False  # the last position has no next token
        if loss_mask is not None:
            eligible &= _shift_left(loss_mask.to(x0.device, torch.bool), False)
        return DiffusionBatch(
            inputs=x0,
            targets=targets,
            loss_weights=eligible.float(),
            masked=eligible,
            num_masked=b * (s - 1) if loss_mask is None else None,
            t=torch.ones(b, device=x0.device),
            attention_mask=self.generation_mask(s, x0.device),
            clean=x0,
            noised=torch.zeros_like(eligible),
        )

    def prepare_eval(self, x0, key) -> DiffusionBatch:
        return self.prepare(x0, key)

    def generation_mask(self, s, device):
        key = (s, str(device))
        if getattr(self, "_causal", (None,))[0] != key:  # one cached tensor per shape
            self._causal = (key, causal_mask(s, device)[None, None])
        return self._causal[1]

    def align_logits(self, logits):
        return _shift_right(logits)

    def decode_defaults(self, seq_len):
        return {"order": "left_to_right", "tokens_per_step": 1}


class ARAdaptation(MaskedDiffusion):
    """Masked diffusion on a causal start: one-token shift and causal -> bidirectional anneal."""

    name = "ar_adapt"

    def __init__(self, schedule, *, anneal_steps: int, shift: bool, seed: int = 0, **kwargs):
        super().__init__(schedule, **kwargs)
        self.anneal_steps = anneal_steps
        self.shift = shift
        self.seed = seed

    @classmethod
    def from_config(cls, cfg, *, mask_id, seq_len):
        return cls(
            build_schedule(cfg.schedule, cfg, horizon=seq_len),
            anneal_steps=cfg.anneal_steps,
            shift=cfg.shift,
            mask_id=mask_id,
            eps=cfg.eps,
            antithetic=cfg.antithetic,
            normalization=cfg.loss_normalization,
            prefix_probability=cfg.prefix_probability,
        )

    def open_fraction(self, step: int) -> float:
        """f(step): the share of non-causal pairs allowed (1 = fully bidirectional)."""
        return 1.0 if self.anneal_steps == 0 else min(1.0, step / self.anneal_steps)

    def attention_mask(self, s: int, step: int, device) -> torch.Tensor | None:
        """[1, 1, s, s] bool, or None once fully bidirectional (fast kernels then apply)."""
        f = self.open_fraction(step)
        if f >= 1.0:
            return None
        u = torch.rand(s, s, generator=derived_generator(self.seed, "anneal", s)).to(device)
        return (causal_mask(s, device) | (u < f))[None, None]

    def prepare(self, x0, key: CorruptionKey, loss_mask=None, x0_host=None) -> DiffusionBatch:
        if self.shift:
            # token 0 is never predicted under the shift: keep it clean, as part of the context
            # (a host mask: the corruption decides on the host)
            first = torch.zeros(x0.shape, dtype=torch.bool)
            first[:, 0] = True
            loss_mask = ~first if loss_mask is None else loss_mask.cpu().bool() & ~first
        batch = super().prepare(x0, key, loss_mask, x0_host)
        return self._finish(batch, x0.shape[1], key.step)

    def prepare_eval(self, x0, key) -> DiffusionBatch:
        batch = super().prepare_eval(x0, key)
        if self.shift:  # position 0 has no predictor under the shift: uncount it
            batch.masked[:, 0] = False
            batch.loss_weights[:, 0] = 0.0
            batch.inputs[:, 0] = batch.targets[:, 0]
            batch.num_masked = None  # changed by the line above, by an amount only the device knows
        return self._finish(batch, x0.shape[1], self.anneal_steps)

    def align_logits(self, logits):
        return _shift_right(logits) if self.shift else logits

    def _finish(self, batch: DiffusionBatch, s: int, step: int) -> DiffusionBatch:
        if self.shift:  # column 0 is clean on both paths, so the shift keeps `num_masked`
            batch.clean, batch.noised = batch.targets, batch.masked
            batch.targets = _shift_left(batch.targets, 0)
            batch.masked = _shift_left(batch.masked, False)
            batch.loss_weights = _shift_left(batch.loss_weights, 0.0)
        batch.attention_mask = self.attention_mask(s, step, batch.inputs.device)
        return batch
