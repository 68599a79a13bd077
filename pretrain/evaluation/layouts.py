"""What each training objective needs to score a continuation: its Monte-Carlo plan and how a
batch of rows becomes the model's input. A registry keyed by `diffusion.objective`.

A batch holds rows of one padded length S: x0 [b, S] (context + continuation, then padding),
`hidden` [b, S] bool (the continuation positions a row masks and scores) and `valid` [b, S] bool
(not padding). `inputs` returns the model's tokens, attention mask and RoPE positions, and
`source`: for each position, the index of the hidden state that predicts it.

    masked    x_t = x0 with `hidden` set to the mask id; bidirectional over the valid tokens
    ar_adapt  the same, and with `diffusion.shift` hidden state i predicts token i + 1
    block     [x_t ; x0] (length 2S, RoPE positions 0..S-1 twice) under the block-diffusion mask:
              each noisy block sees itself and the clean blocks before it
    ar        x0 under a causal mask; hidden state i predicts token i + 1; exact, one row
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.diffusion.schedules import build_schedule
from pretrain.evaluation.estimator import RequestPlan, block_plan, exact_plan, masked_plan
from pretrain.model.attention import block_diffusion_mask, causal_mask

LAYOUTS: dict[str, type[Layout]] = {}


def register_layout(name: str):
    def wrap(cls):
        LAYOUTS[name] = cls
        cls.name = name
        return cls

    return wrap


@dataclass
class Inputs:
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    source: torch.Tensor
    """long [b, S]: hidden-state index predicting each position of the (first) S-long half."""


class Layout:
    name: str
    exact = False
    """True: the plan is the exact log-likelihood (one row, no standard error)."""
    sees_future = True
    """Attention reaches the positions after the continuation (bidirectional models), which
    `Scorer.future_masks` can fill with masks up to the training length."""

    def __init__(self, diffusion_cfg, *, seq_len: int, mask_id: int):
        self.cfg = diffusion_cfg
        self.mask_id = mask_id
        self.schedule = build_schedule(diffusion_cfg.schedule, diffusion_cfg, horizon=seq_len)
        if not self.schedule.is_nelbo:
            # a content-dependent surrogate bounds nothing; any shared schedule gives the same
            # NELBO (uniform order), so the surrogate-trained model is scored with `linear`'s
            self.schedule = build_schedule("linear", horizon=seq_len)

    def plan(self, context_len: int, n: int, samples: int, gen, *, greedy_row: bool):
        return masked_plan(self.schedule, n, samples, gen, greedy_row=greedy_row)

    def inputs(self, x0, hidden, valid) -> Inputs:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} objective, {self.schedule.name} schedule"


def _key_padding(valid: torch.Tensor) -> torch.Tensor:
    """[b, 1, 1, S]: every query may attend every real (non-padding) key."""
    return valid[:, None, None, :]


def _positions(x0: torch.Tensor, shift: int) -> torch.Tensor:
    b, s = x0.shape
    return (torch.arange(s) - shift).clamp(min=0).expand(b, s)


@register_layout("masked")
class MaskedLayout(Layout):
    shift = 0

    def inputs(self, x0, hidden, valid) -> Inputs:
        tokens = torch.where(hidden, self.mask_id, x0)
        return Inputs(tokens, _key_padding(valid), None, _positions(x0, self.shift))


@register_layout("ar_adapt")
class ShiftedLayout(MaskedLayout):
    """AR -> DLM adaptation, scored as the bidirectional model it anneals to."""

    def __init__(self, diffusion_cfg, **kwargs):
        super().__init__(diffusion_cfg, **kwargs)
        self.shift = 1 if diffusion_cfg.shift else 0

    def describe(self) -> str:
        return super().describe() + (" (shifted)" if self.shift else "")


@register_layout("block")
class BlockLayout(Layout):
    sees_future = False  # later blocks are invisible to a block
    def plan(self, context_len, n, samples, gen, *, greedy_row):
        block = self.cfg.block_length
        return block_plan(context_len, n, block, samples, gen, greedy_row=greedy_row)

    def inputs(self, x0, hidden, valid) -> Inputs:
        b, s = x0.shape
        x_t = torch.where(hidden, self.mask_id, x0)
        allowed = block_diffusion_mask(s, self.cfg.block_length)[None, None]  # [1, 1, 2S, 2S]
        keys = torch.cat([valid, valid], dim=1)
        return Inputs(
            tokens=torch.cat([x_t, x0], dim=1),
            attention_mask=allowed & _key_padding(keys),
            position_ids=torch.arange(s).repeat(2),
            source=_positions(x0, 0),  # the noisy half predicts
        )

    def describe(self) -> str:
        return f"block objective (blocks of {self.cfg.block_length}), {self.schedule.name} schedule"


@register_layout("ar")
class CausalLayout(Layout):
    exact = True
    sees_future = False

    def plan(self, context_len, n, samples, gen, *, greedy_row) -> RequestPlan:
        return exact_plan(n)

    def inputs(self, x0, hidden, valid) -> Inputs:
        allowed = causal_mask(x0.shape[1])[None, None] & _key_padding(valid)
        return Inputs(x0, allowed, None, _positions(x0, 1))

    def describe(self) -> str:
        return "ar objective (exact causal log-likelihood)"


def build_layout(diffusion_cfg, *, seq_len: int, mask_id: int) -> Layout:
    from pretrain.errors import ConfigError

    objective = diffusion_cfg.objective
    if objective not in LAYOUTS:
        raise ConfigError(
            f"diffusion.objective: no evaluation layout for '{objective}' "
            f"(expected one of: {', '.join(LAYOUTS)})"
        )
    return LAYOUTS[objective](diffusion_cfg, seq_len=seq_len, mask_id=mask_id)
