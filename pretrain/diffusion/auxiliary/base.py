"""What every joint-consistency auxiliary loss shares: the registry, the weight schedules, the
model view (full-vocabulary logits, per-token CE, sequence energy, whatever wraps the model),
layout-independent sampling, and the set of configured losses the engine runs.

Why auxiliary losses at all (DESIGN.md sec. 6): the masked-diffusion objective trains each
position's marginal p(x0_i | x_t) and never how tokens committed in the same decoding step agree.
Each loss here adds extra forward passes to a training step (reported as a metric) to train that.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from pretrain.config.schema import AuxiliaryLossConfig
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.objective import DiffusionBatch
from pretrain.errors import ConfigError
from pretrain.model.documents import DocumentMask
from pretrain.model.transformer import gather_vocab_parallel

AUXILIARIES: dict[str, type[AuxiliaryLoss]] = {}


def register_auxiliary(cls: type[AuxiliaryLoss]) -> type[AuxiliaryLoss]:
    AUXILIARIES[cls.name] = cls
    return cls


# weight multiplier in [0, 1] at optimizer step `step` (0-based)
WEIGHT_SCHEDULES: dict[str, Callable[[int, AuxiliaryLossConfig], float]] = {
    "constant": lambda step, c: float(step >= c.start_step),
    "linear_ramp": lambda step, c: min(
        1.0, max(0.0, (step - c.start_step + 1) / max(c.ramp_steps, 1))
    ),
}


class ModelView:
    """The model as auxiliary losses and decoders see it.

    `model` is a DeepSpeed engine or a bare `DLMTransformer`; under tensor parallelism its logits
    are vocab-parallel, so `logits` gathers them (every TP rank then holds the same full
    distribution and, with the same seeded uniforms, draws the same samples).
    """

    def __init__(self, model, vocab_size: int, documents: DocumentMask | None = None):
        self.model = model
        self.module = getattr(model, "module", model)
        self.vocab_size = vocab_size
        self.documents = documents
        """The batch's document mask (`data.document_mask`): every forward attends within
        documents, as the objective's forward does."""

    def _mask(self, tokens: torch.Tensor) -> DocumentMask | None:
        """The document mask for `tokens` [k * b, s], k copies of the batch ([x0 ; samples])."""
        if self.documents is None or tokens.shape[0] == self.documents.ids.shape[0]:
            return self.documents
        return self.documents.tile(tokens.shape[0] // self.documents.ids.shape[0])

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> fp32 logits [b, s, V] over the real vocabulary (mask at -inf)."""
        local = self.model(tokens, attention_mask=self._mask(tokens))  # [b, s, V_pad / tp]
        return gather_vocab_parallel(local)[..., : self.vocab_size].float()

    def ce(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """tokens, targets [b, s] -> -log p(target | tokens) [b, s] fp32 (vocab-parallel)."""
        return self.model(tokens, targets=targets, attention_mask=self._mask(tokens))

    def energy(self, tokens: torch.Tensor, *, row: int) -> torch.Tensor:
        """tokens [b, s] -> scalar energy per sequence [b] (`pretrain.model.energy`; `row`: the
        mask token's id, whose output-layer row holds the energy weights)."""
        from pretrain.model.energy import sequence_energy

        return sequence_energy(self.module, tokens, row=row, attention_mask=self._mask(tokens))


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
    """The configured losses, weighted by their schedules; what the engine's hook calls.

    Metric names are `aux/<loss>/<metric>` plus `aux/extra_forwards_per_step` and
    `aux/seconds_per_step` (wall-clock of the auxiliary forwards, excluding their backward).
    """

    def __init__(
        self,
        losses: list[AuxiliaryLoss],
        *,
        vocab_size: int,
        seed: int,
        replica: int = 0,
        replicas: int = 1,
    ):
        self.losses = losses
        self.vocab_size = vocab_size
        self.seed = seed
        self.replica, self.replicas = replica, replicas
        self.metric_names = tuple(
            f"aux/{loss.name}/{m}" for loss in losses for m in ("weight", *loss.metrics)
        ) + ("aux/extra_forwards_per_step", "aux/seconds_per_step")

    def attach(self, module: torch.nn.Module) -> None:
        for loss in self.losses:
            loss.attach(module)

    def step_loss(self, model, batch: DiffusionBatch, micro: int, micro_batches: int, metrics):
        """The engine's hook: micro-batch `micro` of the current optimizer step (DeepSpeed's
        `global_steps`, restored on resume). Adds this micro-batch's metrics to `metrics`."""
        step = model.global_steps
        key = CorruptionKey(self.seed, step, micro, self.replica, micro_batches, self.replicas)
        return self(model, batch, key, metrics, micro_batches=micro_batches)

    def __call__(
        self, model, batch: DiffusionBatch, key: CorruptionKey, metrics: dict, micro_batches=1
    ) -> torch.Tensor:
        """Weighted sum of the losses on `batch`; fills `metrics` (tensors) in place."""
        documents = batch.attention_mask if isinstance(batch.attention_mask, DocumentMask) else None
        view = ModelView(model, self.vocab_size, documents)
        total = torch.zeros((), device=batch.inputs.device)
        forwards, t0 = 0, time.perf_counter()
        for loss in self.losses:
            weight = loss.cfg.weight * WEIGHT_SCHEDULES[loss.cfg.schedule](key.step, loss.cfg)
            values = dict.fromkeys(loss.metrics, torch.zeros(()))
            if weight > 0:  # before its start step a loss costs no forward at all
                value, values = loss(view, batch, key)
                total = total + weight * value
                forwards += loss.extra_forwards
            metrics[f"aux/{loss.name}/weight"] = torch.tensor(weight)
            for m in loss.metrics:
                metrics[f"aux/{loss.name}/{m}"] = values[m].detach().float().cpu()
        # per optimizer step: every micro-batch of the step runs the same forwards
        metrics["aux/extra_forwards_per_step"] = torch.tensor(float(forwards * micro_batches))
        metrics["aux/seconds_per_step"] = torch.tensor((time.perf_counter() - t0) * micro_batches)
        return total


def build_auxiliaries(cfg, *, mask_id: int, vocab_size: int, rt=None) -> AuxiliarySet | None:
    """The set configured in `cfg.auxiliary.losses` (None if empty), checked against the layout."""
    if not cfg.auxiliary.losses:
        return None
    if cfg.parallel.pipeline_parallel > 1:
        raise ConfigError(
            "auxiliary.losses: not supported with parallel.pipeline_parallel > 1 (their extra "
            "forward passes run outside DeepSpeed's pipeline schedule); use tensor/data parallelism"
        )
    if cfg.diffusion.objective != "masked":
        raise ConfigError(
            f"auxiliary.losses: written for diffusion.objective 'masked' (full bidirectional "
            f"sequences), not '{cfg.diffusion.objective}'"
        )
    losses = []
    for i, item in enumerate(cfg.auxiliary.losses):
        where = f"auxiliary.losses[{i}]"
        if item.name not in AUXILIARIES:
            raise ConfigError(
                f"{where}.name: unknown auxiliary loss '{item.name}' "
                f"(expected one of: {', '.join(AUXILIARIES)})"
            )
        if item.schedule not in WEIGHT_SCHEDULES:
            raise ConfigError(
                f"{where}.schedule: unknown schedule '{item.schedule}' "
                f"(expected one of: {', '.join(WEIGHT_SCHEDULES)})"
            )
        if item.name == "energy_nce" and cfg.parallel.sequence_parallel:
            raise ConfigError(
                f"{where}: energy_nce pools the whole sequence; not with parallel.sequence_parallel"
            )
        losses.append(AUXILIARIES[item.name](item, mask_id=mask_id))
    if len({loss.name for loss in losses}) != len(losses):
        raise ConfigError("auxiliary.losses: each loss may appear once")
    return AuxiliarySet(
        losses,
        vocab_size=vocab_size,
        seed=cfg.train.seed,
        replica=rt.dp_rank if rt else 0,
        replicas=rt.dp if rt else 1,
    )
