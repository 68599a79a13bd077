"""What every joint-consistency auxiliary loss shares: the loss interface, the weight schedules,
the model view (full-vocabulary logits, per-token CE, sequence energy), layout-independent
sampling, and the set of configured losses the recipe runs.

Why auxiliary losses at all (docs/design.md, "Joint consistency"): the masked-diffusion
objective trains each position's marginal p(x0_i | x_t) and never how tokens committed in the
same decoding step agree. Each loss here adds extra forward passes to a training step (reported
as a metric) to train that.

How a loss reaches the model. A loss is one function, `loss(view, batch, key)`, that calls the
view: without gradient (inside `torch.no_grad()`) to sample from the model, with gradient for
the terms it trains. Run directly on a model (`ModelView(model, vocab_size)`), each call is a
forward. Inside a training step the calls cannot be forwards of their own: under pipeline
parallelism the model is spread over stages and runs only in the engine's schedules. So the
recipe runs each loss twice on the same seeded randomness:

    record   before the step: no-grad calls run as no-grad forwards through the engine
             (`Engine.infer`, every layout) and their results are kept; gradient calls are
             noted (their tokens) and answered with zeros
    replay   inside the step's forward, on the last stage: no-grad calls return the kept
             results; gradient calls are answered from the hidden states of extra rows that
             the step's forward ran: the noted tokens, appended to the micro-batch

so a loss's gradient terms share the objective's forward and backward. The contract this needs:
a loss's control flow never depends on the values of its gradient calls (true of every loss
here; `replay` checks the calls arrive in the recorded order and shapes).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from pretrain.config.schema import AuxiliaryLossConfig
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.objective import DiffusionBatch
from pretrain.model.inputs import ModelInputs
from pretrain.model.masks import AttentionMask, DocumentMask

# weight multiplier in [0, 1] at optimizer step `step` (0-based)
WEIGHT_SCHEDULES: dict[str, Callable[[int, AuxiliaryLossConfig], float]] = {
    "constant": lambda step, c: float(step >= c.start_step),
    "linear_ramp": lambda step, c: min(
        1.0, max(0.0, (step - c.start_step + 1) / max(c.ramp_steps, 1))
    ),
}

# What a call reads from the last hidden states [s, n, h], given the head.
Read = Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]


def read_logits(hidden, head) -> torch.Tensor:
    return head.full_logits(hidden)  # [n, s, V] fp32


def read_ce(targets: torch.Tensor) -> Read:
    return lambda hidden, head: head.token_ce(hidden, targets)  # [n, s] fp32


def read_energy(row: int) -> Read:
    return lambda hidden, head: head.energy(hidden, row=row)  # [n] fp32


@dataclass
class _Call:
    kind: str
    """'logits' | 'ce' | 'energy'"""
    shape: tuple[int, ...]
    """Shape of the answer."""
    tokens: torch.Tensor | None = None
    """[n, s] the rows the call runs the model on (gradient calls)."""


@dataclass
class Recording:
    """One micro-batch's record of the active losses: their weights, the no-grad answers kept
    for replay, the gradient calls (in order) and the rows they add to the step's forward."""

    weights: dict[str, float]
    calls: list[tuple[_Call, torch.Tensor | None]] = field(default_factory=list)
    """Every call in order: (call, its no-grad answer), or (call, None) for a gradient call."""
    seconds: float = 0.0

    def rows(self) -> torch.Tensor | None:
        """[n_aux, s] the tokens of every gradient call, concatenated (None if there are none)."""
        tokens = [c.tokens for c, answer in self.calls if answer is None]
        return torch.cat(tokens) if tokens else None


class ModelView:
    """The model as auxiliary losses and decoders see it.

    `ModelView(model, vocab_size)` runs `model` (a `DLMTransformer` or a DeepSpeed engine around
    one) directly. Under tensor parallelism its logits are vocab-parallel, so `logits` gathers
    them (every TP rank then holds the same full distribution and, with the same seeded
    uniforms, draws the same samples). `attention` (the batch's documents and/or the objective's
    pattern) applies to every forward, tiled over batches of several copies ([x0 ; samples]);
    `align` maps the model's logits to the token at each input position (an objective's shift).
    """

    def __init__(
        self,
        model,
        vocab_size: int,
        documents: DocumentMask | AttentionMask | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        align: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.attention = AttentionMask.of(documents)
        self.position_ids = position_ids
        self.align = align

    def inputs(self, tokens: torch.Tensor) -> ModelInputs:
        """Model inputs for `tokens` [k * b, s], k copies of the batch."""
        attention = self.attention
        if attention is not None and attention.documents is not None:
            attention = attention.tile(tokens.shape[0] // attention.documents.ids.shape[0])
        return ModelInputs(tokens, self.position_ids, attention)

    def _run(self, call: _Call, tokens: torch.Tensor, read: Read) -> torch.Tensor:
        inputs = self.inputs(tokens)
        return self.model(
            inputs.tokens,
            attention_mask=inputs.attention,
            position_ids=inputs.position_ids,
            loss_fn=read,
        )

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> fp32 logits [b, s, V] over the real vocabulary (mask at -inf)."""
        shape = (*tokens.shape, self.vocab_size)
        return self.align(self._run(_Call("logits", shape), tokens, read_logits))

    def ce(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """tokens, targets [b, s] -> -log p(target | tokens) [b, s] fp32 (vocab-parallel)."""
        return self._run(_Call("ce", tuple(tokens.shape)), tokens, read_ce(targets))

    def energy(self, tokens: torch.Tensor, *, row: int) -> torch.Tensor:
        """tokens [b, s] -> scalar energy per sequence [b] (`pretrain.model.energy`; `row`: the
        mask token's id, whose output-layer row holds the energy weights)."""
        return self._run(_Call("energy", (tokens.shape[0],)), tokens, read_energy(row))


class _RecordingView(ModelView):
    """Record phase: no-grad calls run through `infer(inputs, read, shape)`; gradient calls are
    noted and answered with zeros."""

    def __init__(self, infer, recording: Recording, **kwargs):
        super().__init__(None, **kwargs)
        self.infer, self.recording = infer, recording

    def _run(self, call, tokens, read):
        if torch.is_grad_enabled():
            call.tokens = tokens
            self.recording.calls.append((call, None))
            return torch.zeros(call.shape, device=tokens.device)
        answer = self.infer(self.inputs(tokens), read, call.shape)
        self.recording.calls.append((call, answer))
        return answer


class _ReplayView(ModelView):
    """Replay phase, where the step's forward has run: the calls arrive in the recorded order;
    no-grad calls return their recorded answers, gradient calls read their rows of the hidden
    states [s, n_aux, h]."""

    def __init__(self, recording: Recording, hidden: torch.Tensor, head, **kwargs):
        super().__init__(None, **kwargs)
        self.calls = list(recording.calls)
        self.hidden, self.head, self.offset = hidden, head, 0

    def _run(self, call, tokens, read):
        want, answer = self.calls.pop(0)
        if (want.kind, want.shape) != (call.kind, call.shape):
            raise RuntimeError(
                f"auxiliary loss replay: got a {call.kind}{call.shape} call where "
                f"{want.kind}{want.shape} was recorded (a loss may not branch on the values "
                "of its gradient calls)"
            )
        if answer is not None:
            return answer
        n = tokens.shape[0]
        rows = self.hidden[:, self.offset : self.offset + n]
        self.offset += n
        return read(rows, self.head)


def uniforms(key: CorruptionKey, purpose: str, shape: tuple[int, int], device) -> torch.Tensor:
    """U(0, 1) [b, s], one seeded stream per sequence of the global batch (as the corruption's):
    every TP rank draws the same numbers and any layout draws the same as one process."""
    gens = key.row_generators(shape[0], purpose)
    return torch.stack([torch.rand(shape[1], generator=g) for g in gens]).to(device)


def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [b, s, V], u [b, s] in [0, 1) -> token ids [b, s].

    Zero-probability ids (the mask token) are never drawn: the CDF is flat across them.
    """
    cdf = probs.cumsum(-1)
    target = (u * cdf[..., -1]).unsqueeze(-1).to(cdf.dtype)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


class AuxiliaryLoss(ABC):
    """One auxiliary loss: `__call__(view, batch, key) -> (scalar loss, metrics)`."""

    name: ClassVar[str]
    extra_forwards: ClassVar[int]
    """Forward passes (in sequences of the micro-batch) it adds, with or without gradient."""
    metrics: ClassVar[tuple[str, ...]] = ("loss",)
    """Metric names it reports (each a mean over token slots or sequences)."""

    def __init__(self, cfg: AuxiliaryLossConfig, *, mask_id: int):
        self.cfg = cfg
        self.mask_id = mask_id

    def attach(self, module: torch.nn.Module) -> None:
        """Check (or add) what the loss needs in the model, before it is initialised."""
        return None

    @abstractmethod
    def __call__(
        self, view: ModelView, batch: DiffusionBatch, key: CorruptionKey
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class AuxiliarySet:
    """The configured losses, weighted by their schedules.

    Metric names are `aux/<loss>/<metric>` plus `aux/extra_forwards_per_step` and
    `aux/seconds_per_step` (wall-clock of the auxiliary no-grad forwards of a step; their
    gradient rows run inside the step's own forward and backward).
    """

    def __init__(self, losses: list[AuxiliaryLoss], *, vocab_size: int, seed: int):
        self.losses = losses
        self.vocab_size = vocab_size
        self.seed = seed
        self.metric_names = tuple(
            f"aux/{loss.name}/{m}" for loss in losses for m in ("weight", *loss.metrics)
        ) + ("aux/extra_forwards_per_step", "aux/seconds_per_step")

    def attach(self, module: torch.nn.Module) -> None:
        for loss in self.losses:
            loss.attach(module)

    def weights(self, step: int) -> dict[str, float]:
        return {
            loss.name: loss.cfg.weight * WEIGHT_SCHEDULES[loss.cfg.schedule](step, loss.cfg)
            for loss in self.losses
        }

    # ------------------------------------------------------------- inside a training step
    def record(self, infer, batch: DiffusionBatch, key: CorruptionKey, **view) -> Recording:
        """Record phase for one micro-batch (every rank; `view`: ModelView's keyword
        arguments). Losses whose weight is 0 at this step are skipped: they cost nothing."""
        recording = Recording(self.weights(key.step))
        t0 = time.perf_counter()
        recorder = _RecordingView(infer, recording, vocab_size=self.vocab_size, **view)
        for loss in self.losses:
            if recording.weights[loss.name] > 0:
                loss(recorder, batch, key)
        recording.seconds = time.perf_counter() - t0
        return recording

    def replay(
        self,
        recording: Recording,
        hidden: torch.Tensor,
        head,
        batch: DiffusionBatch,
        key: CorruptionKey,
        metrics: dict,
        *,
        micro_batches: int,
        **view,
    ) -> torch.Tensor:
        """Replay phase, on the hidden states [s, n_aux, h] of the recorded rows: the weighted
        sum of the losses, with their metrics added to `metrics`."""
        replayer = _ReplayView(recording, hidden, head, vocab_size=self.vocab_size, **view)
        total = self._losses(replayer, batch, key, recording.weights, metrics)
        metrics["aux/seconds_per_step"] = torch.tensor(recording.seconds * micro_batches)
        metrics["aux/extra_forwards_per_step"] = torch.tensor(
            float(micro_batches * self._forwards(recording.weights))
        )
        return total

    # ------------------------------------------------------------- a bare model, directly
    def __call__(
        self, model, batch: DiffusionBatch, key: CorruptionKey, metrics: dict, micro_batches=1
    ) -> torch.Tensor:
        """The weighted losses on `batch`, each call a forward of `model` (a training loop of
        one process around a bare model); fills `metrics` (tensors) in place."""
        weights, t0 = self.weights(key.step), time.perf_counter()
        view = ModelView(
            model, self.vocab_size, batch.attention_mask, position_ids=batch.position_ids
        )
        total = self._losses(view, batch, key, weights, metrics)
        metrics["aux/seconds_per_step"] = torch.tensor((time.perf_counter() - t0) * micro_batches)
        metrics["aux/extra_forwards_per_step"] = torch.tensor(
            float(micro_batches * self._forwards(weights))
        )
        return total

    def _forwards(self, weights: dict[str, float]) -> int:
        return sum(loss.extra_forwards for loss in self.losses if weights[loss.name] > 0)

    def _losses(self, view, batch, key, weights, metrics) -> torch.Tensor:
        total = torch.zeros((), device=batch.inputs.device)
        for loss in self.losses:
            weight = weights[loss.name]
            values = dict.fromkeys(loss.metrics, torch.zeros(()))
            if weight > 0:  # before its start step a loss costs no forward at all
                value, values = loss(view, batch, key)
                total = total + weight * value
            metrics[f"aux/{loss.name}/weight"] = torch.tensor(weight)
            for m in loss.metrics:
                metrics[f"aux/{loss.name}/{m}"] = values[m].detach().float()
        return total
