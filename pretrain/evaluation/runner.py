"""One harness run on our model: the tasks, the seeds, and our estimator report in the results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pretrain.evaluation.taskdirs import task_manager


def evaluate_tasks(
    lm,
    tasks: Sequence[str],
    *,
    include_paths: Sequence[str | Path] = (),
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    seed: int = 1234,
    bootstrap_iters: int = 100_000,
    log_samples: bool = False,
) -> dict | None:
    """`lm_eval.simple_evaluate` on `lm` (a `DLMEvalHarness`); the harness's results dict with
    our `dlm` section (Monte-Carlo standard errors, requests/s), on every process: each one
    holds every score (`DataParallel`), so the harness reports as rank 0 everywhere (None only
    if it declines to report). Every seed the harness takes (few-shot sampling, python, numpy,
    torch) is `seed`."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager(tasks, include_paths),
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is not None:
        results["dlm"] = lm.estimator_report()
    return results
