"""Training objectives. An objective turns clean tokens into a model input plus per-token loss
weights (`prepare`), per-token cross-entropies into a scalar loss (`loss`), and says how a model
it trained is run at generation time (`generation_mask`, `align_logits`, `decode_defaults`).

Splitting it this way keeps the objective ignorant of the parallel layout: the corruption runs
before the model (identically on every rank of a replica), and the loss is a weighted sum of the
per-token CE the model's last stage produces, whatever the pipeline or tensor layout. The recipe
(`pretrain.diffusion.recipe`) puts an objective together with document masks and auxiliary
losses; the objectives are listed in `pretrain.diffusion.registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pretrain.config import DiffusionConfig
from pretrain.diffusion.corruption import CorruptionKey, mask_tokens, sample_times, to_device
from pretrain.diffusion.labels import per_token_slot_name
from pretrain.diffusion.registry import objective_spec
from pretrain.diffusion.schedules import NoiseSchedule, build_schedule
from pretrain.model.masks import DocumentMask


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
    """The objective's attention pattern: None (bidirectional) or bool [1, 1, s, s], True = may
    attend (the recipe adds the documents of `data.document_mask`)."""
    num_masked: int | None = None
    """`masked.sum()` when the host knows it without a device sync (else None)."""
    position_ids: torch.Tensor | None = None
    """None (0..s-1) or long [s]: RoPE positions shared by the batch (block diffusion)."""
    clean: torch.Tensor | None = None
    """[b, s] the clean tokens in input positions, where they differ from `targets` (the
    one-token shift); None means `targets`."""
    noised: torch.Tensor | None = None
    """[b, s] bool: the input positions holding the mask token, where they differ from
    `masked` (the shift); None means `masked`."""

    @property
    def clean_inputs(self) -> torch.Tensor:
        return self.targets if self.clean is None else self.clean

    @property
    def corrupted(self) -> torch.Tensor:
        return self.masked if self.noised is None else self.noised


# Explicit normalisation (docs/design.md §3): the metric name says which one produced the loss.
NORMALIZATIONS: dict[str, tuple[str, Callable[[torch.Tensor, DiffusionBatch], torch.Tensor]]] = {
    # sum over masked tokens / (B * L): an unbiased per-token NELBO estimate (LLaDA pretraining)
    "token_slot": ("nelbo_per_token_slot", lambda s, b: s / b.targets.numel()),
    # sum over masked tokens / number masked: lower variance, biased towards high-t sequences
    "masked_token": (
        "weighted_ce_per_masked_token",
        lambda s, b: s / b.masked.sum().clamp(min=1),
    ),
}


def context_distance(visible: torch.Tensor | None, x0: torch.Tensor) -> torch.Tensor:
    """Distance d_i [b, s] (float64) from the visible context before position i: the number of
    positions between i and the last visible position before it (0 right after a prefix); i
    itself when nothing before it is visible."""
    b, s = x0.shape
    index = torch.arange(s, device=x0.device).expand(b, s)
    if visible is None:
        return index.double()
    last = torch.where(visible, index, -1).cummax(dim=1).values  # last visible at or before i
    return (index - last - 1).clamp(min=0).double()


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
        prefix_probability: float = 0.0,
    ):
        self.schedule = schedule
        self.prefix_probability = prefix_probability
        self.mask_id = mask_id
        self.eps = eps
        self.antithetic = antithetic
        self.z = schedule.window_normalizer(eps)
        self.metric_name, self._normalize = NORMALIZATIONS[normalization]
        # A content-dependent schedule is a surrogate, not a bound: its loss is never named for
        # a likelihood.
        self.bound_name = per_token_slot_name(schedule)  # pretrain.diffusion.labels
        if self.metric_name == "nelbo_per_token_slot":
            self.metric_name = self.bound_name
        # Every key `loss` reports, plus the loss itself, in a fixed order for reductions. All are
        # means over token slots, so micro-batches and replicas (equal slot counts) average
        # exactly; ratios such as `ce_masked` are derived afterwards by `summarize`.
        self.metric_names = tuple(
            dict.fromkeys(
                [
                    "loss",
                    self.metric_name,
                    self.bound_name,
                    "masked_ce_per_token_slot",
                    "masked_fraction",
                ]
            )
        )

    def prepare(
        self,
        x0: torch.Tensor,
        key: CorruptionKey,
        loss_mask: torch.Tensor | None = None,
        x0_host: torch.Tensor | None = None,
    ) -> DiffusionBatch:
        """Corrupt a training micro-batch x0 [b, s] at the times the key assigns it.

        `loss_mask` [b, s] bool (None: every position eligible): positions where it is False (an
        SFT prompt, padding) stay clean, are never targets, and count as visible context for
        position-aware schedules. With `prefix_probability` > 0, a keyed random-length prefix of
        a sequence also stays clean and out of the loss (prefix conditioning, docs/design.md §4).
        `x0_host`: the same tokens on the host when x0 is on a GPU: per-position noise levels
        (position-aware schedules, prefixes, loss masks) are then computed there, so preparing
        the batch never waits for the device.
        """
        t = sample_times(x0.shape[0], key, eps=self.eps, antithetic=self.antithetic)
        visible = self._prefix(x0, key)  # [b, s] on the host, or None
        # all True: the default path (a host loss_mask answers this without a device sync)
        if loss_mask is not None and not bool(loss_mask.all()):
            hidden_from_loss = ~loss_mask.to("cpu", torch.bool)
            visible = hidden_from_loss if visible is None else visible | hidden_from_loss
        generators = key.row_generators(x0.shape[0], "mask")
        return self._corrupt(x0, t, generators, visible, x0_host)

    def _prefix(self, x0: torch.Tensor, key: CorruptionKey) -> torch.Tensor | None:
        """bool [b, s]: a clean prefix of length U{1..s-1} with probability `prefix_probability`
        per sequence (keyed like the masks, so every layout draws the same prefixes)."""
        if self.prefix_probability <= 0:
            return None
        b, s = x0.shape
        lengths = []
        for g in key.row_generators(b, "prefix"):
            keep = torch.rand(1, generator=g).item() < self.prefix_probability
            length = int(torch.randint(1, s, (1,), generator=g)) if keep and s > 1 else 0
            lengths.append(length)
        return torch.arange(s)[None] < torch.tensor(lengths)[:, None]  # [b, s], host

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

    def _corrupt(self, x0, t, generators, visible=None, x0_host=None) -> DiffusionBatch:
        sched = self.schedule
        if visible is None and not sched.position_aware and sched.is_nelbo:
            # shared schedule, nothing visible: one alpha and one weight per sequence
            alpha = sched.alpha(t)[:, None]  # [b, 1]
            x_t, masked, count = mask_tokens(x0, alpha, self.mask_id, generators)
            weight = to_device((self.z * sched.weight(t))[:, None], x0.device)  # [b, 1]
            loss_weights = masked.float() * weight
            t = to_device(t, x0.device)
            return DiffusionBatch(x_t, x0, loss_weights, masked, t, num_masked=count)
        # Per position: on the host when it holds the tokens (no device sync), else where x0 is.
        ref = x0_host if x0_host is not None else x0
        visible = None if visible is None else visible.to(ref.device)
        distance = context_distance(visible, ref)  # [b, s]
        tt = t.to(ref.device, torch.float64)[:, None]  # [b, 1]
        alpha = sched.alpha(tt, distance, ref).expand(ref.shape)  # [b, s]
        maskable = None if visible is None else ~visible
        x_t, masked, count = mask_tokens(x0, alpha.float(), self.mask_id, generators, maskable)
        weight = to_device(sched.loss_weight(tt, self.eps, distance, ref).float(), x0.device)
        # where() not a product: a weight may be 0/0 where a position cannot be masked
        loss_weights = torch.where(masked, weight, 0.0)
        t = to_device(t, x0.device)
        return DiffusionBatch(x_t, x0, loss_weights, masked, t, num_masked=count)

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
            self.bound_name: (weighted / slots).detach(),
            "masked_ce_per_token_slot": (torch.where(batch.masked, ce, 0.0).sum() / slots).detach(),
            "masked_fraction": (batch.masked.sum() / slots).detach(),
        }
        return loss, metrics

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, *, mask_id: int, seq_len: int):
        return cls(
            build_schedule(cfg.schedule, cfg, horizon=seq_len),
            mask_id=mask_id,
            eps=cfg.eps,
            antithetic=cfg.antithetic,
            normalization=cfg.loss_normalization,
            prefix_probability=cfg.prefix_probability,
        )

    @staticmethod
    def summarize(means: dict[str, float]) -> dict[str, float]:
        """Add ratios to averaged metrics: `ce_masked`, the mean CE per masked token."""
        out = dict(means)
        out["ce_masked"] = means["masked_ce_per_token_slot"] / max(means["masked_fraction"], 1e-12)
        return out

    # ------------------------------------------------------------------ generation
    def generation_mask(self, s: int, device) -> torch.Tensor | None:
        """The attention pattern a model trained by this objective decodes under ([1, 1, s, s]
        bool, or None for bidirectional)."""
        return None

    def align_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits [b, s, V] -> logits for the token at each input position (the
        identity unless the objective shifts its targets)."""
        return logits

    def decode_defaults(self, seq_len: int) -> dict:
        """Sampler keyword arguments that match training: order, schedule, block length."""
        if self.schedule.position_aware:
            return {"order": "schedule", "schedule": self.schedule}
        return {"order": "confidence"}

    def documents(self, docs: DocumentMask) -> DocumentMask:
        """The document mask of this objective's input for documents `docs` of x0 (the same
        positions, unless the input is longer than the sequence)."""
        return docs


def build_objective(cfg: DiffusionConfig, *, mask_id: int, seq_len: int = 128):
    """The configured objective (registry: `pretrain.diffusion.registry`); `seq_len` is the
    horizon position-aware schedules measure distances against."""
    cls = objective_spec(cfg.objective).load()
    return cls.from_config(cfg, mask_id=mask_id, seq_len=seq_len)
