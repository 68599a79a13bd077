"""Validation NELBO on fixed sequences, t-grid and masks, so evaluations are comparable.

All validation batches have the same size, so per-slot metrics average over batches. With
`train.eval_batches=0` there is nothing to evaluate: no metrics. A run whose schedule is a
surrogate (`frequency`) reports its surrogate loss under that name, never as a NELBO.
"""

from __future__ import annotations

from collections import defaultdict

from pretrain.diffusion.corruption import CorruptionKey
from pretrain.parallel.engine import host_metrics


def evaluate(run) -> dict[str, float]:
    """`val/<bound>` and `val/ce_masked` of `run` (a `pretrain.run.Run`); collective."""
    data, recipe, engine, rt = run.data, run.recipe, run.engine, run.rt
    if not data.val:
        return {}
    sums: dict[str, float] = defaultdict(float)
    for i, x0 in enumerate(data.val):
        key = CorruptionKey(run.cfg.train.seed, 0, i, rt.dp_rank, len(data.val), rt.dp)
        docs = data.document_ids(x0) if run.cfg.data.document_mask else None
        batch = recipe.prepare_eval(x0, key, rt.device, document_ids=docs)
        local = engine.eval_step(batch, recipe.loss)
        for name, value in host_metrics(
            engine.global_metrics(local, recipe.eval_metric_names)
        ).items():
            sums[name] += value / len(data.val)
    means = recipe.summarize(sums)
    return {f"val/{k}": means[k] for k in (recipe.bound_name, "ce_masked")}
