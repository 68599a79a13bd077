"""Harness tasks during training: `eval.tasks` every `eval.task_interval` steps, logged to MLflow
next to the validation NELBO as `tasks/<task>/<metric>`.

The model runs through the training engine's no-grad forward (`Engine.infer`), so every layout
works: the ranks of one replica (its tensor- and pipeline-parallel ranks) score the same rows
together, and the data-parallel replicas split the requests, so a task costs 1/DP of one
replica's time; every rank then holds the same results, and rank 0 logs them. Sequence
parallelism splits the hidden states along the sequence, which the scoring's gather of the
scored positions does not handle: the tasks are skipped there, with a message.

The trainer's hook, like the probe's:

    tasks = TrainingTasks.build(run, say)          # before the loop
    tasks.maybe_run(done, tracker, say)            # after the validation pass
"""

from __future__ import annotations

import math
import re
import time

from pretrain.evaluation.distributed import DataParallel

METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-./ ]")
"""Characters MLflow does not allow in a metric name."""


def metric_name(task: str, key: str) -> str | None:
    """('dlm_agreement', 'acc,none') -> 'tasks/dlm_agreement/acc'; a filter other than `none`
    joins the metric ('exact_match,strict-match' -> '.../exact_match_strict-match'); None for
    entries that are not metrics ('alias', 'samples')."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    name = metric if filt == "none" else f"{metric}_{filt}"
    return METRIC_NAME.sub("_", f"tasks/{task}/{name}")


def flatten_results(results: dict) -> dict[str, float]:
    """The harness's results (and group results) plus our estimator report -> MLflow metrics."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, entries in (results.get(section) or {}).items():
            for key, value in entries.items():
                name = metric_name(task, key)
                if name and isinstance(value, int | float) and math.isfinite(value):
                    out[name] = float(value)
    report = results.get("dlm", {})
    for task, row in report.get("tasks", {}).items():
        for key in ("mc_stderr_mean", "decisions_within_2se"):
            out[METRIC_NAME.sub("_", f"tasks/{task}/{key}")] = float(row[key])
    for kind, row in report.get("speed", {}).items():
        out[f"tasks/{kind}_requests_per_s"] = float(row["requests_per_s"])
    return out


def run_tasks(run, *, dp=None) -> dict[str, float]:
    """Run `cfg.eval.tasks` on the model of `run` (a `pretrain.run.Run`) and return
    `tasks/<task>/<metric>` metrics (on every rank; empty when no tasks are set). Collective.

    `dp`: the `DataParallel` replicas that share the requests (None: this process alone).
    """
    cfg = run.cfg
    if not cfg.eval.tasks:
        return {}
    from pretrain.evaluation.harness import DLMEvalHarness
    from pretrain.evaluation.loading import from_run
    from pretrain.evaluation.runner import evaluate_tasks

    lm = DLMEvalHarness(
        model=from_run(run),
        mc_samples=cfg.eval.task_mc_samples,
        batch_size=cfg.train.micro_batch_size,
        seed=cfg.train.seed,
        dp=dp or DataParallel.single(),
    )
    saved = _rng_state()  # the harness seeds the global generators; training must not notice
    try:
        results = evaluate_tasks(
            lm,
            cfg.eval.tasks,
            include_paths=[cfg.eval.include_path] if cfg.eval.include_path else [],
            limit=cfg.eval.task_limit,
            seed=cfg.train.seed,
            bootstrap_iters=1000,  # closed-form stderr for means; bootstraps stay short
        )
    finally:
        _set_rng_state(saved)
    return flatten_results(results) if results is not None else {}


def _rng_state() -> tuple:
    import random

    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


class TrainingTasks:
    """The trainer's hook: `maybe_run(step, tracker, say)` every `eval.task_interval` steps."""

    def __init__(self, run, *, interval: int, dp: DataParallel | None = None):
        self.run, self.interval, self.dp = run, interval, dp

    @classmethod
    def build(cls, run, say=print) -> TrainingTasks:
        cfg, rt = run.cfg, run.rt
        interval = cfg.eval.task_interval if cfg.eval.tasks else 0
        if interval and cfg.parallel.sequence_parallel:
            say("[dlm] eval.tasks: skipped with sequence parallelism (hidden states are split)")
            interval = 0
        dp = DataParallel.single()
        if interval and rt.dp > 1:  # the replicas split the requests; a replica's ranks do not
            from megatron.core import parallel_state

            group = parallel_state.get_data_parallel_group()
            dp = DataParallel(rt.dp_rank, rt.dp, group)
        return cls(run, interval=interval, dp=dp)

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def maybe_run(self, step: int, tracker, say) -> dict[str, float]:
        if not self.due(step):
            return {}
        start = time.perf_counter()
        metrics = run_tasks(self.run, dp=self.dp)
        if self.run.rt.is_main:
            tracker.log_metrics(metrics, step=step)
            shown = {k: v for k, v in metrics.items() if not k.endswith("_per_s")}
            say(
                f"[dlm] step {step} tasks ({time.perf_counter() - start:.1f} s) "
                + " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            )
        return metrics
