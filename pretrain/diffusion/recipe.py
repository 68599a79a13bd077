"""The recipe: everything a run's objective means, from a batch of clean tokens to the loss.

    tokens (host) --prepare--> StepBatch --engine--> hidden [s, B, h] --loss--> (loss, metrics)

`prepare` corrupts the micro-batch with the objective (`pretrain.diffusion.objective` and its
subclasses), adds the attention the objective and `data.document_mask` call for (the objective's
pattern intersected with the documents), and runs the auxiliary losses' record phase
(`pretrain.diffusion.auxiliary.base`: their no-grad sampling forwards through `Engine.infer`,
and the rows their gradient terms add to the micro-batch). `loss` is what the engine runs on the
last hidden states of the whole micro-batch: the objective's weighted CE on its rows (the head
only at masked positions with `model.sparse_output`), then the auxiliary losses' replay on
theirs. The engine knows none of this; the recipe knows no layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.diffusion.auxiliary.base import AuxiliarySet, Recording
from pretrain.diffusion.corruption import CorruptionKey, to_device
from pretrain.diffusion.objective import DiffusionBatch
from pretrain.model.inputs import ModelInputs
from pretrain.model.masks import AttentionMask, DocumentMask


@dataclass
class StepBatch:
    """One micro-batch as the engine runs it: the objective's rows, then the auxiliary rows."""

    batch: DiffusionBatch
    """The objective's corrupted micro-batch (b rows)."""
    attention: AttentionMask | None
    """The objective's pattern and the documents of its rows."""
    key: CorruptionKey
    recording: Recording | None = None
    """The auxiliary losses' record (training steps with auxiliary losses), else None."""

    def aux_rows(self) -> torch.Tensor | None:
        return None if self.recording is None else self.recording.rows()

    def model_inputs(self) -> ModelInputs:
        tokens, attention = self.batch.inputs, self.attention
        rows = self.aux_rows()
        if rows is not None:  # the auxiliary rows are copies of the batch (k per loss call)
            copies = 1 + rows.shape[0] // tokens.shape[0]
            tokens = torch.cat([tokens, rows.to(tokens.dtype)])
            attention = None if attention is None else attention.tile(copies)
        return ModelInputs(tokens, self.batch.position_ids, attention)


class Recipe:
    """An objective, the run's document masking and its auxiliary losses, as one loss."""

    def __init__(
        self,
        objective,
        *,
        auxiliary: AuxiliarySet | None = None,
        document_mask: bool = False,
        sparse_output: bool = True,
    ):
        self.objective = objective
        self.auxiliary = auxiliary
        self.document_mask = document_mask
        self.sparse_output = sparse_output
        self.eval_metric_names = tuple(objective.metric_names)
        extra = auxiliary.metric_names if auxiliary is not None else ()
        self.train_metric_names = self.eval_metric_names + tuple(extra)

    @property
    def bound_name(self) -> str:
        """The validation metric: the NELBO per token slot, or the surrogate's loss."""
        return self.objective.bound_name

    # ------------------------------------------------------------------ batches
    def prepare(
        self,
        tokens: torch.Tensor,
        key: CorruptionKey,
        device,
        *,
        loss_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        infer=None,
    ) -> StepBatch:
        """A training micro-batch from clean host tokens [b, s]. `loss_mask` (host bool [b, s],
        False on padding), `document_ids` (host [b, s], with `data.document_mask`), `infer`
        (`Engine.infer`: the auxiliary losses' sampling forwards)."""
        x0 = to_device(tokens, device)
        batch = self.objective.prepare(x0, key, loss_mask, x0_host=tokens)
        step = StepBatch(batch, self._attention(batch, document_ids, device), key)
        if self.auxiliary is not None and infer is not None:
            step.recording = self.auxiliary.record(infer, batch, key, **self._view(step))
        return step

    def prepare_eval(
        self, tokens: torch.Tensor, key: CorruptionKey, device, *, document_ids=None
    ) -> StepBatch:
        """A validation micro-batch: the objective's fixed t-grid and masks (`prepare_eval`)."""
        batch = self.objective.prepare_eval(to_device(tokens, device), key)
        return StepBatch(batch, self._attention(batch, document_ids, device), key)

    def _attention(self, batch: DiffusionBatch, document_ids, device) -> AttentionMask | None:
        docs = None
        if self.document_mask:
            if document_ids is None:
                raise ValueError("data.document_mask: the batch carries no document ids")
            # segments found on the host, copied asynchronously (no device sync in the step)
            host = DocumentMask.from_ids(document_ids)
            docs = self.objective.documents(host.map(lambda t: to_device(t, device)))
        if docs is None and batch.attention_mask is None:
            return None
        return AttentionMask(batch.attention_mask, docs)

    def _view(self, step: StepBatch) -> dict:
        """How the auxiliary losses' model view runs the model for this micro-batch."""
        return {
            "documents": step.attention,
            "position_ids": step.batch.position_ids,
            "align": self.objective.align_logits,
        }

    # ------------------------------------------------------------------ the loss
    def loss(self, hidden: torch.Tensor, head, step: StepBatch) -> tuple[torch.Tensor, dict]:
        """hidden [s, B, h] of `step.model_inputs()` -> (scalar loss, metrics). `metrics['loss']`
        is the objective's loss; the auxiliary losses report under `aux/`."""
        batch = step.batch
        b = batch.inputs.shape[0]
        main = hidden[:, :b] if hidden.shape[1] > b else hidden
        positions = batch.masked if self.sparse_output else None
        count = batch.num_masked if self.sparse_output else None
        ce = head.token_ce(main, batch.targets, positions, count)  # [b, s]
        loss, metrics = self.objective.loss(ce, batch)
        metrics = {"loss": loss.detach(), **metrics}
        if step.recording is not None and torch.is_grad_enabled():  # training terms only
            loss = loss + self.auxiliary.replay(
                step.recording,
                hidden[:, b:],
                head,
                batch,
                step.key,
                metrics,
                micro_batches=step.key.micro_batches,
                **self._view(step),
            )
        return loss, metrics

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        return self.objective.summarize(means)


def build_recipe(cfg, *, mask_id: int, vocab_size: int) -> Recipe:
    """The recipe of a run's config: objective (registry), auxiliary losses, document masks."""
    from pretrain.diffusion.auxiliary.registry import build_auxiliaries
    from pretrain.diffusion.objective import build_objective
    from pretrain.diffusion.registry import check_config

    check_config(cfg)
    objective = build_objective(cfg.diffusion, mask_id=mask_id, seq_len=cfg.data.seq_len)
    return Recipe(
        objective,
        auxiliary=build_auxiliaries(cfg, mask_id=mask_id, vocab_size=vocab_size),
        document_mask=cfg.data.document_mask,
        sparse_output=cfg.model.sparse_output,
    )
