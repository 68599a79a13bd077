"""The training loop: batches -> engine step (the recipe's loss) -> metrics -> eval -> checkpoint.

`train()` reads top to bottom; what it is built from (runtime, data, recipe, engine, resumed
state) comes from `pretrain.run.build_run`, and everything it calls lives in its own package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.checkpoint.schedule import SaveSchedule
from pretrain.config import Config, flatten, to_yaml
from pretrain.evaluation.during_training import TrainingTasks
from pretrain.evaluation.joint_consistency import joint_consistency
from pretrain.evaluation.validation import evaluate
from pretrain.guards import NonFiniteGuard, SpikeDetector
from pretrain.parallel.runtime import Runtime
from pretrain.preemption import PreemptionGuard, clear_marker
from pretrain.probe.hook import TrainingProbe
from pretrain.run import build_run
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
    run = build_run(cfg)  # runtime, data, recipe, engine; resumed from the latest checkpoint
    rt, data, recipe, engine, ckpts = run.rt, run.data, run.recipe, run.engine, run.checkpoints
    run_dir, start, state = run.run_dir, run.start, run.trainer_state or {}
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
        if not run.resumed_from:
            tracker.log_params(flatten(cfg))
            tracker.log_artifact(run_dir / "config.yaml")
    say = print if rt.is_main else (lambda *a, **k: None)
    params = sum(p.numel() for _, p in engine.canonical_parameters())
    say(
        f"[dlm] {cfg.run.name}: {params / 1e6:.2f}M params on rank 0, "
        f"{rt.world_size} process(es) (tp={rt.tp} pp={rt.pp} dp={rt.dp}), {rt.device}, "
        f"{'bf16 autocast' if rt.autocast else str(rt.dtype).removeprefix('torch.')}, "
        + (
            f"resumed at step {start} from {run.resumed_from}"
            if run.resumed_from
            else "fresh start"
        )
    )
    if run.resume_note:  # the latest checkpoint failed verification, or had no hashes
        say(run.resume_note)
    if note := document_mask_note(cfg, rt):
        say(note)
    result = TrainResult(run_dir=run_dir, tracking_uri=tracker.uri, run_id=tracker.run_id)
    probe = TrainingProbe.build(run, say)  # eval.probe_interval > 0
    tasks = TrainingTasks.build(run, say)  # eval.tasks every eval.task_interval steps
    end = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
    window = MetricWindow()  # metrics stay on the device between log lines
    nonfinite = NonFiniteGuard(cfg.train.on_nonfinite, checkpoints_dir=ckpts.directory)
    spikes = SpikeDetector(cfg.train.spike_zscore, cfg.train.spike_window)
    schedule = SaveSchedule(cfg.train.checkpoint_interval, cfg.train.checkpoint_minutes)
    status = "FAILED"
    guard = PreemptionGuard.install()  # SIGTERM/SIGUSR1: checkpoint at a step boundary, stop
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            batches = run.step_batches(step)
            local = engine.train_step(batches, recipe.loss)
            metrics = engine.global_metrics(local, recipe.train_metric_names)  # no host sync
            done = step + 1
            stop = guard.should_stop() and done < end  # collective: all ranks stop together
            log_now = done % cfg.train.log_interval == 0 or done == end
            eval_now = _every(cfg.train.eval_interval, done) or done == end
            save_now = schedule.due(done) or done == end or stop  # due() first: collective
            boundary = log_now or eval_now or save_now or probe.due(done)
            resolved = window.add(done, metrics, started=t0, resolve=boundary)
            result.losses |= resolved
            if boundary:  # the metrics are on the host here: no extra device sync
                last_good = result.checkpoint or run.resumed_from
                nonfinite.check(resolved, engine.grad_norm, last_good=last_good)
                for spike_step, z in spikes.update(resolved):
                    say(f"[dlm] step {spike_step}: loss spike ({z:.1f} standard deviations)")
            if log_now:
                logged = recipe.summarize(window.means())
                logged["tokens_per_s"] = data.global_tokens_per_step / logged["step_time_s"]
                logged["lr"] = engine.lr
                logged.update(engine.router_metrics())  # MoE: expert load, router losses
                logged.update(data.metrics())
                if (grad_norm := engine.grad_norm) is not None:
                    logged["grad_norm"] = grad_norm
                if (skipped := engine.skipped_steps) is not None:
                    logged["train/skipped_steps"] = float(skipped)
                logged.update(spikes.metrics())
                tracker.log_metrics(logged, step=done)
                say(f"[dlm] step {done}/{cfg.train.steps} " + _kv(logged))
            if eval_now:
                result.evals[done] = evaluate(run)
                if cfg.auxiliary.eval_tokens_per_step:  # the parallel-decoding gap
                    result.evals[done] |= joint_consistency(run)
                tracker.log_metrics(result.evals[done], step=done)
                say(f"[dlm] step {done} eval " + _kv(result.evals[done]))
            probe.maybe_run(done, tracker, say)
            if task_metrics := tasks.maybe_run(done, tracker, say):
                result.evals.setdefault(done, {}).update(task_metrics)
            if save_now:
                trainer_state = {
                    "data": data.stream.state_dict(),
                    "rng_cpu": torch.get_rng_state(),
                    "tracking_run_id": tracker.run_id,
                }
                result.checkpoint = ckpts.save(
                    engine,
                    done,
                    trainer_state=trainer_state,
                    config_yaml=to_yaml(cfg),
                    wait=done == end or stop,  # the last save is complete before the exit
                )
            for note in ckpts.poll():  # saves completed; raises a failed background save
                say(note)
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
        run.close()
    last = result.preempted_at or end
    say(f"[dlm] {'stopped' if result.preempted_at else 'done'} at step {last}: run dir {run_dir}")
    if tracker.run_id:
        say(f"[dlm] MLflow run {tracker.run_id} in {tracker.uri}")
        say(f"[dlm] browse it with: mlflow ui --backend-store-uri {tracker.uri}")
    return result


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


def _every(interval: int, step: int) -> bool:
    """True every `interval` steps; never for an interval of 0."""
    return bool(interval) and step % interval == 0


def _kv(metrics: dict[str, float]) -> str:
    ordered = sorted(metrics, key=lambda k: (k != "loss", k))
    return " ".join(f"{k}={metrics[k]:.4g}" for k in ordered)
