"""Harness tasks during training: `eval.tasks` every `eval.task_interval` steps, logged to MLflow
next to the validation NELBO as `tasks/<task>/<metric>`.

Every data-parallel replica scores its share of the requests on its own model copy (the tensor-
parallel ranks of a replica run the same rows and gather the vocabulary slices), so a task costs
1/DP of one replica's time; every rank then holds the same results, and rank 0 logs them. With
pipeline parallelism or ZeRO-3 no rank holds whole layers, and sequence parallelism splits the
hidden states along the sequence: the tasks are skipped with a message.

The trainer's hook, like the probe's:

    tasks = TrainingTasks.build(cfg, engine, rt, say)          # before the loop
    tasks.maybe_run(done, tracker, say)                         # after the validation pass
"""

from __future__ import annotations

import math
import re
import time

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


def run_tasks(
    module,
    cfg,
    *,
    tensor_parallel: bool = False,
    dp_group=None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Run `cfg.eval.tasks` on the training model `module` (this rank's `DLMTransformer`) and
    return `tasks/<task>/<metric>` metrics (on every rank; empty when no tasks are set).

    `dp_group`: the data-parallel group whose replicas share the requests (None: the default
    group, i.e. every process is a replica). The module is put in eval mode and back.
    """
    if not cfg.eval.tasks:
        return {}
    from pretrain.evaluation.harness import DLMEvalHarness
    from pretrain.evaluation.loading import from_module
    from pretrain.evaluation.runner import evaluate_tasks

    lm = DLMEvalHarness(
        model=from_module(module, cfg, tensor_parallel=tensor_parallel),
        mc_samples=cfg.eval.task_mc_samples,
        batch_size=batch_size or cfg.train.micro_batch_size,
        seed=cfg.train.seed,
        dp_group=dp_group,
    )
    was_training = module.training
    module.eval()
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
        module.train(was_training)
        _set_rng_state(saved)
    # the harness reports on LOCAL_RANK 0 only; the other ranks get the same metrics from it
    metrics = flatten_results(results) if results is not None else None
    found = [m for m in lm.dp.gather_list([metrics]) if m is not None]
    return found[0] if found else {}


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

    def __init__(self, module, cfg, *, interval: int, tensor_parallel: bool, dp_group):
        self.module, self.cfg, self.interval = module, cfg, interval
        self.tensor_parallel, self.dp_group = tensor_parallel, dp_group

    @classmethod
    def build(cls, cfg, engine, rt, say=print) -> TrainingTasks:
        interval = cfg.eval.task_interval if cfg.eval.tasks else 0
        if interval and (rt.pp > 1 or cfg.parallel.zero_stage == 3):
            say("[dlm] eval.tasks: skipped for pp > 1 or ZeRO-3 layouts (no rank holds the model)")
            interval = 0
        if interval and cfg.parallel.sequence_parallel:
            say("[dlm] eval.tasks: skipped with sequence parallelism (hidden states are split)")
            interval = 0
        group = None
        if interval and rt.world_size > 1:
            from megatron.core import parallel_state

            group = parallel_state.get_data_parallel_group()
        return cls(
            engine.ds.module, cfg, interval=interval, tensor_parallel=rt.tp > 1, dp_group=group
        )

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def maybe_run(self, step: int, tracker, say) -> dict[str, float]:
        if not self.due(step):
            return {}
        start = time.perf_counter()
        metrics = run_tasks(
            self.module, self.cfg, tensor_parallel=self.tensor_parallel, dp_group=self.dp_group
        )
        tracker.log_metrics(metrics, step=step)  # the tracker writes on rank 0 only
        shown = {k: v for k, v in metrics.items() if not k.endswith("_per_s")}
        say(
            f"[dlm] step {step} tasks ({time.perf_counter() - start:.1f} s) "
            + " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        )
        return metrics
