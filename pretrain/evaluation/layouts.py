"""What each training objective needs to score a continuation: its Monte-Carlo plan and how a
batch of rows becomes the model's input. A registry keyed by `diffusion.objective`; every layout
holds the objective itself (`build_objective`), so the noise schedule whose NELBO weights score a
continuation, the attention pattern and the shift are the objective's own.

A batch holds rows of one padded length S: x0 [b, S] (context + continuation, then padding),
`hidden` [b, S] bool (the continuation positions a row masks and scores) and `valid` [b, S] bool
(not padding). `inputs` returns the model's `ModelInputs` and `source` [b, S]: for each position,
the index of the hidden state that predicts it. Padding is a second "document" of its row
(`DocumentMask`): real tokens never attend to it, in every attention backend and layout.

    masked    x_t = x0 with `hidden` set to the mask id; bidirectional over the valid tokens
    ar_adapt  the same under the objective's annealed pattern (none once annealed), and with
              `diffusion.shift` hidden state i predicts token i + 1
    block     [x_t ; x0] (length 2S, RoPE positions 0..S-1 twice) under the block-diffusion mask:
              each noisy block sees itself and the clean blocks before it
    ar        x0 under the causal mask; hidden state i predicts token i + 1; exact, one row
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.diffusion.schedules import build_schedule
from pretrain.evaluation.estimator import RequestPlan, block_plan, exact_plan, masked_plan
from pretrain.model.inputs import ModelInputs
from pretrain.model.masks import AttentionMask, DocumentMask

LAYOUTS: dict[str, type[Layout]] = {}


def register_layout(name: str):
    def wrap(cls):
        LAYOUTS[name] = cls
        cls.name = name
        return cls

    return wrap


@dataclass
class Inputs:
    model: ModelInputs
    """On the host; `backends.to_device` moves them."""
    source: torch.Tensor
    """long [b, S]: hidden-state index predicting each position of the (first) S-long half."""


class Layout:
    name: str
    exact = False
    """True: the plan is the exact log-likelihood (one row, no standard error)."""
    sees_future = True
    """Attention reaches the positions after the continuation (bidirectional models), which
    `Scorer.future_masks` can fill with masks up to the training length."""
    shift = 0

    def __init__(self, objective):
        self.objective = objective
        self.mask_id = objective.mask_id
        self.schedule = objective.schedule
        if not self.schedule.is_nelbo:
            # a content-dependent surrogate bounds nothing; any shared schedule gives the same
            # NELBO (uniform order), so the surrogate-trained model is scored with `linear`'s
            self.schedule = build_schedule("linear", horizon=self.schedule.horizon)

    def plan(self, context_len: int, n: int, samples: int, gen, *, greedy_row: bool):
        return masked_plan(self.schedule, n, samples, gen, greedy_row=greedy_row)

    def pattern(self, s: int) -> torch.Tensor | None:
        """The objective's attention pattern over an input of length s (None: bidirectional)."""
        return None

    def inputs(self, x0, hidden, valid) -> Inputs:
        tokens = torch.where(hidden, self.mask_id, x0)
        model = ModelInputs(tokens, None, _attention(self.pattern(x0.shape[1]), valid))
        return Inputs(model, _positions(x0, self.shift))

    def describe(self) -> str:
        return f"{self.name} objective, {self.schedule.name} schedule"


def _attention(pattern, valid: torch.Tensor, copies: int = 1) -> AttentionMask | None:
    """The pattern, and padding as a document of its own when a row has any (ids 0 then 1 along
    each row; `copies` = 2 for the two halves of [x_t ; x0])."""
    docs = None
    if not bool(valid.all()):
        docs = DocumentMask.from_ids((~valid).to(torch.int32))
        if copies == 2:
            docs = docs.concat_positions()
    if pattern is None and docs is None:
        return None
    return AttentionMask(pattern, docs)


def _positions(x0: torch.Tensor, shift: int) -> torch.Tensor:
    b, s = x0.shape
    return (torch.arange(s) - shift).clamp(min=0).expand(b, s)


@register_layout("masked")
class MaskedLayout(Layout):
    pass


@register_layout("ar_adapt")
class ShiftedLayout(Layout):
    """AR -> DLM adaptation, scored as the model at the end of its anneal (as validation is)."""

    def __init__(self, objective):
        super().__init__(objective)
        self.shift = 1 if objective.shift else 0

    def pattern(self, s):
        return self.objective.attention_mask(s, self.objective.anneal_steps, "cpu")

    def describe(self) -> str:
        return super().describe() + (" (shifted)" if self.shift else "")


@register_layout("block")
class BlockLayout(Layout):
    sees_future = False  # later blocks are invisible to a block

    def plan(self, context_len, n, samples, gen, *, greedy_row):
        block = self.objective.block_length
        return block_plan(context_len, n, block, samples, gen, greedy_row=greedy_row)

    def inputs(self, x0, hidden, valid) -> Inputs:
        b, s = x0.shape
        x_t = torch.where(hidden, self.mask_id, x0)
        model = ModelInputs(
            tokens=torch.cat([x_t, x0], dim=1),
            position_ids=torch.arange(s).repeat(2),
            attention=_attention(self.objective.mask(s, "cpu"), valid, copies=2),
        )
        return Inputs(model, _positions(x0, 0))  # the noisy half predicts

    def describe(self) -> str:
        block = self.objective.block_length
        return f"block objective (blocks of {block}), {self.schedule.name} schedule"


@register_layout("ar")
class CausalLayout(Layout):
    exact = True
    sees_future = False
    shift = 1

    def plan(self, context_len, n, samples, gen, *, greedy_row) -> RequestPlan:
        return exact_plan(n)

    def pattern(self, s):
        return self.objective.generation_mask(s, "cpu")

    def describe(self) -> str:
        return "ar objective (exact causal log-likelihood)"


def build_layout(diffusion_cfg, *, seq_len: int, mask_id: int) -> Layout:
    """The layout of a model trained with `diffusion_cfg` on sequences of `seq_len` (the
    horizon of position-aware schedules, as in training)."""
    from pretrain.diffusion.objective import build_objective
    from pretrain.errors import ConfigError

    objective = diffusion_cfg.objective
    if objective not in LAYOUTS:
        raise ConfigError(
            f"diffusion.objective: no evaluation layout for '{objective}' "
            f"(expected one of: {', '.join(LAYOUTS)})"
        )
    built = build_objective(diffusion_cfg, mask_id=mask_id, seq_len=seq_len)
    return LAYOUTS[objective](built)
