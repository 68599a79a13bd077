"""Block diffusion (BD3-LM): autoregressive over blocks, masked diffusion within a block.

A sequence of L tokens is split into n = L / B blocks; block j gets its own time t_j and is
denoised given the clean blocks before it. The NELBO is the sum of the blocks' NELBOs:

    L = sum_j E_{t_j} E_q  sum_{i in block j} 1[x_t^i = m] Z w(t_j) (-log p(x0_i | x_t^{block j},
                                                                              x0^{blocks < j})).

Vectorised training runs all blocks in one forward over [x_t ; x0] (length 2L, RoPE positions
0..L-1 twice) under the mask M = M_BD | M_OBC | M_BC (`block_diffusion_mask`): every noisy block
sees itself and the clean blocks before it, clean tokens see clean blocks causally. Only the x_t
half carries loss weights. The attention backend must take a mask: `flex` on GPU (block-sparse),
`sdpa` / `masked` with the explicit boolean mask on CPU. Generation decodes block by block with
`block_causal_mask` (`generation_mask`). With `data.document_mask` the block mask and the
document mask intersect: position i of either half belongs to the document of x0_i.
"""

from __future__ import annotations

import torch

from pretrain.diffusion.corruption import CorruptionKey, mask_tokens, to_device
from pretrain.diffusion.masks import block_causal_mask, block_diffusion_mask
from pretrain.diffusion.objective import DiffusionBatch, MaskedDiffusion
from pretrain.diffusion.schedules import build_schedule
from pretrain.errors import ConfigError


class BlockDiffusion(MaskedDiffusion):
    """Masked diffusion within blocks of `block_length`, autoregressive across blocks."""

    name = "block"

    def __init__(self, schedule, *, block_length: int, **kwargs):
        if schedule.position_aware or not schedule.is_nelbo:
            raise ConfigError(
                f"diffusion.schedule: the block objective needs a shared NELBO schedule "
                f"(linear, cosine, loglinear), got '{schedule.name}'"
            )
        super().__init__(schedule, **kwargs)
        self.block_length = block_length
        self._masks: dict = {}

    @classmethod
    def from_config(cls, cfg, *, mask_id, seq_len):
        if seq_len % cfg.block_length:
            raise ConfigError(
                f"diffusion.block_length ({cfg.block_length}) must divide data.seq_len ({seq_len})"
            )
        return cls(
            build_schedule(cfg.schedule, cfg, horizon=seq_len),
            block_length=cfg.block_length,
            mask_id=mask_id,
            eps=cfg.eps,
            antithetic=cfg.antithetic,
            normalization=cfg.loss_normalization,
        )

    def block_times(self, b: int, length: int, key: CorruptionKey, purpose: str) -> torch.Tensor:
        """t [b, n]: one time per block, keyed by the sequence's global index. Stratified within a
        sequence ((u + j/n) mod 1, j = block) when antithetic, so each sequence spans all noise
        levels; independent uniforms otherwise."""
        n = length // self.block_length
        rows = []
        for g in key.row_generators(b, purpose):
            if self.antithetic:
                u = torch.rand(1, generator=g, dtype=torch.float64)
                rows.append(torch.remainder(u + torch.arange(n, dtype=torch.float64) / n, 1.0))
            else:
                rows.append(torch.rand(n, generator=g, dtype=torch.float64))
        return (self.eps + (1.0 - self.eps) * torch.stack(rows)).float()

    def prepare(self, x0, key, loss_mask=None, x0_host=None) -> DiffusionBatch:
        del x0_host  # the block clocks are per block, decided on the host without the tokens
        t = self.block_times(x0.shape[0], x0.shape[1], key, "block-t")
        return self._corrupt_blocks(x0, t, key.row_generators(x0.shape[0], "mask"), loss_mask)

    def prepare_eval(self, x0, key) -> DiffusionBatch:
        # the fixed midpoint t-grid of the masked objective, shifted per block (still fixed)
        b, n = x0.shape[0], x0.shape[1] // self.block_length
        j = torch.arange(b, dtype=torch.float64)[:, None] + key.offset(b)
        grid = torch.remainder((j + 0.5) / key.total(b) + torch.arange(n) / n, 1.0)
        t = (self.eps + (1.0 - self.eps) * grid).float()
        return self._corrupt_blocks(x0, t, key.row_generators(b, "eval-mask"), None)

    def _corrupt_blocks(self, x0, t, generators, loss_mask) -> DiffusionBatch:
        """x0 [b, L], t [b, n] -> batch over [x_t ; x0] of length 2L."""
        b, length = x0.shape
        # t stays on the host with the masks, which are then decided (and counted) there
        t_tok = t.repeat_interleave(self.block_length, dim=1)  # [b, L]
        alpha = self.schedule.alpha(t_tok)
        maskable = None if loss_mask is None else loss_mask.bool()
        x_t, masked, count = mask_tokens(x0, alpha, self.mask_id, generators, maskable)
        weight = to_device(self.z * self.schedule.weight(t_tok), x0.device)  # [b, L]
        weights = torch.where(masked, weight, 0.0).float()
        clean = torch.zeros_like(masked)
        positions = torch.arange(length, device=x0.device).repeat(2)  # [2L]
        return DiffusionBatch(
            inputs=torch.cat([x_t, x0], dim=1),
            targets=torch.cat([x0, x0], dim=1),
            loss_weights=torch.cat([weights, torch.zeros_like(weights)], dim=1),
            masked=torch.cat([masked, clean], dim=1),
            t=to_device(t.mean(dim=1), x0.device),
            attention_mask=self.mask(length, x0.device),
            position_ids=positions,
            num_masked=count,  # the clean copy adds no masked positions
        )

    def mask(self, length: int, device) -> torch.Tensor:
        """[1, 1, 2L, 2L] bool, cached (the FlexAttention backend keys its BlockMask on it)."""
        key = (length, str(device))
        if key not in self._masks:
            m = block_diffusion_mask(length, self.block_length, device=device)
            self._masks[key] = m[None, None]
        return self._masks[key]

    def loss(self, ce, batch):
        """Per token slot of the sequence (L per row, not the 2L of the doubled input)."""
        loss, metrics = super().loss(ce, batch)
        # the x0 half never carries weight: rescale slot-normalised metrics from 2L to L slots
        half = {self.bound_name, "masked_ce_per_token_slot", "masked_fraction"}
        if self.metric_name in half:
            loss = loss * 2
        return loss, {k: v * 2 if k in half else v for k, v in metrics.items()}

    def generation_mask(self, s, device):
        return block_causal_mask(s, self.block_length, device)[None, None]

    def decode_defaults(self, seq_len):
        return {"order": "confidence", "block_length": self.block_length}

    def documents(self, docs):
        return docs.concat_positions()  # the input is [x_t ; x0]
