"""One run, assembled from its config: what the trainer, the benchmarks and the tests all use.

    run = build_run(cfg)            runtime, data, recipe, engine (weights from a checkpoint to
                                    resume or `train.init_from`, else the seeded init)
    run.step_batches(step)          the corrupted micro-batches of optimizer step `step`
    run.engine.train_step(batches, run.recipe.loss)

The data stream and checkpoint resume belong here because they decide what the engine is built
with; the loop itself (logging, evaluation, checkpoints, stop signals) is `pretrain.trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint.manager import (
    CheckpointManager,
    load_trainer_state,
    open_checkpoint,
    restore_optimizer,
    weight_loader,
)
from pretrain.checkpoint.runlock import acquire_run_lock
from pretrain.config import Config
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.recipe import Recipe, StepBatch, build_recipe
from pretrain.errors import DataError
from pretrain.parallel.build import build_engine
from pretrain.parallel.engine import Engine
from pretrain.parallel.runtime import Runtime, init_runtime


class TrainData:
    """The training stream and the fixed validation batches of this data-parallel rank.

    Checks the shards' manifest against the config before anything is built, so a mismatch is a
    one-line error naming both sides rather than a shape error deep in the model.
    """

    def __init__(self, cfg: Config, rt: Runtime):
        from data_pipeline.loader import LoaderStream
        from data_pipeline.manifest import check_compatible
        from data_pipeline.mixing import Source
        from data_pipeline.reader import eval_batches
        from data_pipeline.tokenizer import load_tokenizer, tokenizer_sha256

        cfg.data.validate()
        sources = [Source(s.path, s.weight, s.shard_url) for s in cfg.data.sources] or [
            Source(cfg.data.path, 1.0, cfg.data.shard_url)
        ]
        self.stream = LoaderStream(
            num_workers=cfg.data.num_workers,
            sources=sources,
            split="train",
            batch_size=cfg.train.micro_batch_size,
            dp_rank=rt.dp_rank,
            dp_size=rt.dp,
            seed=cfg.train.seed,
            verify_checksums=cfg.data.verify_checksums,
            on_bad_shard=cfg.data.on_bad_shard,
            truncate_fraction=cfg.data.truncate_fraction,
        )
        self.manifest = self.stream.manifest
        self.eos_id = self.manifest.tokenizer.eos_id
        self.mask_id = self.manifest.tokenizer.mask_id
        self.data_dir = Path(sources[0].path)
        expected_sha = None
        if cfg.data.tokenizer:
            expected_sha = tokenizer_sha256(load_tokenizer(cfg.data.tokenizer))
        check_compatible(
            self.manifest,
            where=str(self.data_dir / "manifest.json"),
            seq_len=cfg.data.seq_len,
            vocab_size=cfg.model.vocab_size,
            tokenizer_sha256=expected_sha,
        )
        # The model may have more embeddings than the tokenizer has ids (never fewer: checked).
        self.vocab_size = cfg.model.vocab_size or self.manifest.tokenizer.vocab_size
        self.global_tokens_per_step = (
            cfg.train.micro_batch_size * cfg.train.grad_accum_steps * rt.dp * cfg.data.seq_len
        )
        self.val: list[torch.Tensor] = []
        self._val_source = dict(
            data_dir=sources[0].path,
            split="val",
            num_batches=cfg.train.eval_batches,
            verify_checksums=cfg.data.verify_checksums,
            shard_url=sources[0].shard_url,
        )
        self._micro, self._dp = cfg.train.micro_batch_size, rt.dp
        if cfg.train.eval_batches and self.manifest.splits.get("val"):
            self.val = list(
                eval_batches(
                    batch_size=self._micro, dp_rank=rt.dp_rank, dp_size=rt.dp, **self._val_source
                )
            )
        elif cfg.train.eval_batches:
            raise DataError(f"{sources[0].path}/manifest.json: no 'val' split to evaluate on")
        self.skip_bad = cfg.data.on_bad_shard == "skip"

    def global_val(self) -> list[torch.Tensor]:
        """The validation batches of every data-parallel replica together, one global batch per
        tensor: what one process with the same global batch evaluates, whatever the layout."""
        from data_pipeline.reader import eval_batches

        if self._dp == 1 or not self.val:
            return self.val
        return list(eval_batches(batch_size=self._micro * self._dp, **self._val_source))

    def document_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, s] document index per position of clean host tokens (EOS ends a document)."""
        from data_pipeline.reader import document_ids

        return document_ids(tokens, self.eos_id)

    def metrics(self) -> dict[str, float]:
        """Data-health counters logged with the training metrics (this rank's reader)."""
        return {"data/skipped_shards": self.stream.skipped_shards} if self.skip_bad else {}


@dataclass
class Run:
    cfg: Config
    rt: Runtime
    data: TrainData
    recipe: Recipe
    engine: Engine
    checkpoints: CheckpointManager
    run_dir: Path
    start: int = 0
    """The first optimizer step this call runs (0, or the resumed checkpoint's step)."""
    resumed_from: Path | None = None
    trainer_state: dict | None = None
    """The resumed checkpoint's trainer state (tracking run id, ...), else None."""
    resume_note: str | None = None
    """One line when the resume fell back past `latest` or verified by size only."""
    lock: object | None = None
    """The run's exclusive lock (`pretrain.checkpoint.runlock`); `close()` releases it."""

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def step_batches(self, step: int) -> list[StepBatch]:
        """The micro-batches of optimizer step `step` (0-based) on this rank.

        The corruption is drawn on the host from keyed generators and reaches the device by
        asynchronous copies, so preparing a step never waits for the previous one (except for
        the auxiliary losses' sampling forwards, which need the current weights).
        """
        accum = self.cfg.train.grad_accum_steps
        document_mask = self.cfg.data.document_mask
        batches = []
        for micro in range(accum):
            tokens = self.data.stream.next_batch()  # loss_mask: False on truncation padding
            key = CorruptionKey(
                self.cfg.train.seed, step, micro, self.rt.dp_rank, accum, self.rt.dp
            )
            batches.append(
                self.recipe.prepare(
                    tokens.tokens,
                    key,
                    self.rt.device,
                    loss_mask=tokens.loss_mask,
                    document_ids=tokens.document_ids if document_mask else None,
                    infer=self.engine.infer,
                )
            )
        return batches


def build_run(cfg: Config, *, resume: bool | None = None) -> Run:
    """Everything a training run needs, for this process's place in the layout. `resume`
    (default: `train.resume == 'auto'`) continues from the run's latest checkpoint."""
    rt = init_runtime(cfg)
    if cfg.model.fp8:  # before anything is written: FP8 needs the tensor cores (or emulation)
        from pretrain.model.fp8 import check_fp8_hardware, emulation_requested

        if not emulation_requested():
            check_fp8_hardware(cfg.model.fp8, rt.device)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    data = TrainData(cfg, rt)
    recipe = build_recipe(cfg, mask_id=data.mask_id, vocab_size=data.vocab_size)
    lock = acquire_run_lock(run_dir, rt.rank)  # one trainer per run, else one line naming it
    ckpts = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.train.keep_last, rank=rt.rank)
    resume = cfg.train.resume == "auto" if resume is None else resume
    verify = cfg.train.verify_checkpoints
    resume_from, note = ckpts.resume_point(verify=verify) if resume else (None, None)
    layers = cfg.model.num_layers
    # the resume point was verified just now; `init_from` is verified when opened
    reader = open_checkpoint(resume_from, num_layers=layers, verify=False) if resume_from else None
    init_from = cfg.train.init_from if not reader else None  # weights only, e.g. AR -> DLM
    weights = reader or (
        open_checkpoint(Path(init_from), num_layers=layers, verify=verify) if init_from else None
    )
    engine = build_engine(
        cfg,
        rt,
        vocab_size=data.vocab_size,
        mask_token_id=data.mask_id,
        load_weights=weight_loader(weights, tp_rank=rt.tp_rank, tp_size=rt.tp) if weights else None,
    )
    run = Run(cfg, rt, data, recipe, engine, ckpts, run_dir, resume_note=note, lock=lock)
    if reader:  # any layout can resume any checkpoint: tensors are re-sliced as needed
        restore_optimizer(engine, reader, tp_rank=rt.tp_rank, tp_size=rt.tp)
        run.start, run.resumed_from = reader.common["step"], resume_from
        run.trainer_state = load_trainer_state(resume_from, rt.rank)
        data.stream.load_state_dict(run.trainer_state["data"])
        torch.set_rng_state(run.trainer_state["rng_cpu"])
    return run
