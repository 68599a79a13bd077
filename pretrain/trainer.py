"""The training loop: data -> corruption -> model -> objective -> engine step -> metrics ->
eval -> checkpoint. `train()` reads top to bottom; everything it calls lives in its own package.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launcher.signals import PreemptionGuard, clear_marker
from pretrain.checkpoint.manager import (
    CheckpointManager,
    load_trainer_state,
    open_checkpoint,
    restore_optimizer,
    weight_loader,
)
from pretrain.checkpoint.runlock import acquire_run_lock
from pretrain.config import Config, flatten, to_yaml
from pretrain.diffusion.auxiliary.metric import joint_consistency
from pretrain.diffusion.corruption import CorruptionKey, to_device
from pretrain.diffusion.objective import build_objective
from pretrain.errors import DataError
from pretrain.model.documents import DocumentMask
from pretrain.parallel.engine import build_engine, host_metrics
from pretrain.parallel.runtime import Runtime, init_runtime
from pretrain.probe.hook import TrainingProbe
from pretrain.tracking.mlflow_tracker import create_tracker
from pretrain.tracking.window import MetricWindow


@dataclass
class TrainResult:
    run_dir: Path
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each optimizer step run in this call, keyed by global step (1-based)."""
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoint: Path | None = None
    tracking_uri: str | None = None
    run_id: str | None = None
    preempted_at: int | None = None
    """The step at which a stop signal (SIGTERM/SIGUSR1) checkpointed and ended this call."""


def train(cfg: Config, *, stop_at: int | None = None) -> TrainResult:
    """Train `cfg` to `train.steps` (or checkpoint and stop after global step `stop_at`)."""
    rt = init_runtime(cfg)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    data = TrainData(cfg, rt)
    mask_id = data.manifest.tokenizer.mask_id
    objective = build_objective(cfg.diffusion, mask_id=mask_id, seq_len=cfg.data.seq_len)
    lock = acquire_run_lock(run_dir, rt.rank)  # one trainer per run: else raises naming it
    ckpts = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.train.keep_last, rank=rt.rank)
    verify = cfg.train.verify_checkpoints
    resume_from, note = (
        ckpts.resume_point(verify=verify) if cfg.train.resume == "auto" else (None, None)
    )
    reader = (
        open_checkpoint(resume_from, num_layers=cfg.model.num_layers, verify=False)
        if resume_from
        else None
    )
    init_from = cfg.train.init_from if not reader else None  # weights only, e.g. AR -> DLM
    weights = reader or (
        open_checkpoint(Path(init_from), num_layers=cfg.model.num_layers, verify=verify)
        if init_from
        else None
    )
    engine = build_engine(
        cfg,
        rt,
        vocab_size=data.vocab_size,
        mask_token_id=mask_id,
        objective=objective,
        load_weights=weight_loader(weights, tp_rank=rt.tp_rank, tp_size=rt.tp) if weights else None,
    )
    start, state = 0, {}
    if reader:  # any layout can resume any checkpoint: tensors are re-sliced as needed
        restore_optimizer(engine, reader, tp_rank=rt.tp_rank, tp_size=rt.tp)
        start, state = reader.common["step"], load_trainer_state(resume_from, rt.rank)
        data.stream.load_state_dict(state["data"])
        torch.set_rng_state(state["rng_cpu"])
    tracker = create_tracker(
        enabled=cfg.tracking.enabled,
        is_main=rt.is_main,
        uri=cfg.tracking.uri,
        experiment=cfg.tracking.experiment,
        run_name=cfg.run.name,
        output_dir=cfg.run.output_dir,
        run_id=state.get("tracking_run_id"),
        startup_timeout_s=cfg.tracking.startup_timeout_s,
        timeout_s=cfg.tracking.timeout_s,
        on_error=cfg.tracking.on_error,
    )
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_marker(run_dir)  # a restarted job is no longer the preempted one
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if not reader:
            tracker.log_params(flatten(cfg))
            tracker.log_artifact(run_dir / "config.yaml")
    say = print if rt.is_main else (lambda *a, **k: None)
    params = sum(p.numel() for _, p in engine.canonical_parameters())
    say(
        f"[dlm] {cfg.run.name}: {params / 1e6:.2f}M params on rank 0, "
        f"{rt.world_size} process(es) (tp={rt.tp} pp={rt.pp} dp={rt.dp}), {rt.device}, "
        f"{'bf16 autocast' if rt.autocast else str(rt.dtype).removeprefix('torch.')}, "
        + (f"resumed at step {start} from {resume_from}" if reader else "fresh start")
    )

    if note:  # the latest checkpoint failed verification, or had no hashes
        say(note)
    if note := document_mask_note(cfg, rt):
        say(note)
    result = TrainResult(run_dir=run_dir, tracking_uri=tracker.uri, run_id=tracker.run_id)
    probe = TrainingProbe.build(cfg, data, engine, rt, say)  # eval.probe_interval > 0
    end = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
    window = MetricWindow()  # metrics stay on the device between log lines
    status = "FAILED"
    guard = PreemptionGuard.install()  # SIGTERM/SIGUSR1: checkpoint at a step boundary, stop
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            batches = step_batches(data, objective, cfg, rt, step)
            metrics = engine.global_metrics(engine.train_step(batches))  # no host sync
            done = step + 1
            stop = guard.should_stop() and done < end  # collective: all ranks stop together
            log_now = done % cfg.train.log_interval == 0 or done == end
            eval_now = _every(cfg.train.eval_interval, done) or done == end
            save_now = _every(cfg.train.checkpoint_interval, done) or done == end or stop
            boundary = log_now or eval_now or save_now or probe.due(done)
            result.losses |= window.add(done, metrics, started=t0, resolve=boundary)
            if log_now:
                logged = objective.summarize(window.means())
                logged["tokens_per_s"] = data.global_tokens_per_step / logged["step_time_s"]
                logged["lr"] = engine.lr
                logged.update(data.metrics())
                if (grad_norm := engine.grad_norm) is not None:
                    logged["grad_norm"] = grad_norm
                tracker.log_metrics(logged, step=done)
                say(f"[dlm] step {done}/{cfg.train.steps} " + _kv(logged))
            if eval_now:
                result.evals[done] = evaluate(engine, objective, data, cfg, rt)
                if cfg.auxiliary.eval_tokens_per_step:  # the parallel-decoding gap
                    result.evals[done] |= joint_consistency(engine, objective, data, cfg, rt)
                tracker.log_metrics(result.evals[done], step=done)
                say(f"[dlm] step {done} eval " + _kv(result.evals[done]))
            probe.maybe_run(done, tracker, say)
            if save_now:
                trainer_state = {
                    "data": data.stream.state_dict(),
                    "rng_cpu": torch.get_rng_state(),
                    "tracking_run_id": tracker.run_id,
                }
                result.checkpoint = ckpts.save(
                    engine, done, trainer_state=trainer_state, config_yaml=to_yaml(cfg)
                )
                say(f"[dlm] step {done} checkpoint {result.checkpoint}")
            if stop:
                result.preempted_at = guard.mark_preempted(run_dir, done, is_main=rt.is_main)
                say(f"[dlm] preempted at step {done}: checkpointed; a restart resumes here")
                break
        status = "KILLED" if result.preempted_at else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        guard.uninstall()
        tracker.finish(status)
        lock.release()
    last = result.preempted_at or end
    say(f"[dlm] {'stopped' if result.preempted_at else 'done'} at step {last}: run dir {run_dir}")
    if tracker.run_id:
        say(f"[dlm] MLflow run {tracker.run_id} in {tracker.uri}")
        say(f"[dlm] browse it with: mlflow ui --backend-store-uri {tracker.uri}")
    return result


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
        expected_sha = None
        if cfg.data.tokenizer:
            expected_sha = tokenizer_sha256(load_tokenizer(cfg.data.tokenizer))
        check_compatible(
            self.manifest,
            where=str(Path(sources[0].path) / "manifest.json"),
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

    def metrics(self) -> dict[str, float]:
        """Data-health counters logged with the training metrics (this rank's reader)."""
        return {"data/skipped_shards": self.stream.skipped_shards} if self.skip_bad else {}


def step_batches(data: TrainData, objective, cfg: Config, rt: Runtime, step: int) -> list:
    """The corrupted micro-batches of optimizer step `step` (0-based) on this rank.

    The corruption is drawn on the host from keyed generators and reaches the device by
    asynchronous copies (`to_device`), so preparing a step never waits for the previous one.
    """
    accum = cfg.train.grad_accum_steps
    batches = []
    for micro in range(accum):
        tokens = data.stream.next_batch()  # loss_mask: False on truncation padding
        key = CorruptionKey(cfg.train.seed, step, micro, rt.dp_rank, accum, rt.dp)
        # the loss mask stays on the host: the objective decides masks there
        x0 = to_device(tokens.tokens, rt.device)
        batch = objective.prepare(x0, key, tokens.loss_mask, x0_host=tokens.tokens)
        if cfg.data.document_mask:
            batch.attention_mask = document_mask(tokens.document_ids, rt.device)
        batches.append(batch)
    return batches


def document_mask_note(cfg: Config, rt: Runtime) -> str | None:
    """A hint when document masks would run as a dense mask on a GPU."""
    if (
        cfg.data.document_mask
        and rt.device.type == "cuda"
        and cfg.model.attention_backend == "sdpa"
    ):
        return (
            "[dlm] note: data.document_mask with the 'sdpa' backend computes every attention "
            "tile and masks it (a dense mask); 'flash' (varlen) or 'flex' skip the tiles across "
            "documents and were 1.85x faster on an H100 (bench/README.md)"
        )
    return None


def document_mask(ids: torch.Tensor, device) -> DocumentMask:
    """`data.document_mask`'s attention mask from host ids [b, s]: segments found on the host,
    copied asynchronously (no device sync in the step)."""
    return DocumentMask.from_ids(ids).map(lambda t: to_device(t, device))


def evaluate(engine, objective, data: TrainData, cfg: Config, rt: Runtime) -> dict[str, float]:
    """Validation NELBO on fixed sequences, t-grid and masks, so evaluations are comparable.

    All validation batches have the same size, so per-slot metrics average over batches.
    With `train.eval_batches=0` there is nothing to evaluate: no metrics.
    """
    from data_pipeline.reader import document_ids

    if not data.val:
        return {}
    sums: dict[str, float] = defaultdict(float)
    for i, x0 in enumerate(data.val):
        key = CorruptionKey(cfg.train.seed, 0, i, rt.dp_rank, len(data.val), rt.dp)
        batch = objective.prepare_eval(to_device(x0, rt.device), key)
        if cfg.data.document_mask:
            batch.attention_mask = document_mask(document_ids(x0, data.eos_id), rt.device)
        for name, value in host_metrics(engine.global_metrics(engine.eval_step(batch))).items():
            sums[name] += value / len(data.val)
    means = objective.summarize(sums)
    return {f"val/{k}": means[k] for k in ("nelbo_per_token_slot", "ce_masked")}


def _every(interval: int, step: int) -> bool:
    """True every `interval` steps; never for an interval of 0."""
    return bool(interval) and step % interval == 0


def _kv(metrics: dict[str, float]) -> str:
    ordered = sorted(metrics, key=lambda k: (k != "loss", k))
    return " ".join(f"{k}={metrics[k]:.4g}" for k in ordered)
