"""A surrogate loss is never called a NELBO (pretrain/diffusion/labels.py).

The `frequency` schedule's weights do not integrate to a likelihood bound, so no metric computed
from it may carry "nelbo" in its name. The naming rule is tested here; the objective's own metric
names follow it: `MaskedDiffusion` takes its per-slot name from
`labels.per_token_slot_name(schedule)`.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.config import DiffusionConfig
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.labels import bound_name, per_token_slot_name
from pretrain.diffusion.objective import build_objective
from pretrain.diffusion.schedules import SCHEDULES, build_schedule


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_the_rule_names_a_bound_only_for_nelbo_schedules(name):
    schedule = build_schedule(name)
    expected = "nelbo" if schedule.is_nelbo else "surrogate_loss"
    assert bound_name(schedule) == expected
    assert per_token_slot_name(schedule) == f"{expected}_per_token_slot"
    assert bound_name(None) == "nelbo"
    assert ("nelbo" in per_token_slot_name(schedule)) == schedule.is_nelbo


def _objective_metric_names(schedule: str, normalization: str = "token_slot") -> set[str]:
    objective = build_objective(
        DiffusionConfig(schedule=schedule, loss_normalization=normalization), mask_id=9
    )
    x0 = torch.randint(0, 9, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = objective.prepare(x0, CorruptionKey(0, 0))
    _, metrics = objective.loss(torch.rand(4, 16), batch)
    return set(objective.metric_names) | set(metrics)


@pytest.mark.parametrize("normalization", ["token_slot", "masked_token"])
def test_nelbo_schedules_keep_their_nelbo_names(normalization):
    names = _objective_metric_names("linear", normalization)
    assert "nelbo_per_token_slot" in names


@pytest.mark.parametrize("normalization", ["token_slot", "masked_token"])
def test_the_frequency_surrogate_reports_no_nelbo(normalization):
    names = _objective_metric_names("frequency", normalization)
    assert not any("nelbo" in n for n in names), sorted(names)
    assert "surrogate_loss_per_token_slot" in names


def test_a_frequency_run_logs_no_nelbo_metric(demo_data, tmp_path, runtime):
    """Through the trainer: what reaches MLflow (training and validation) names no NELBO."""
    import mlflow
    from conftest import tiny_overrides

    from pretrain.config import load_config
    from pretrain.trainer import train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = tiny_overrides(
        demo_data,
        tmp_path,
        "freq",
        **{
            "train.steps": 2,
            "train.log_interval": 1,
            "diffusion.schedule": "frequency",
            "tracking.enabled": True,
            "tracking.uri": uri,
        },
    )
    result = train(load_config("configs/tiny.yaml", overrides))
    logged = set(mlflow.MlflowClient(tracking_uri=uri).get_run(result.run_id).data.metrics)
    logged |= {k for ev in result.evals.values() for k in ev}
    assert not any("nelbo" in k for k in logged), sorted(logged)
    assert "val/surrogate_loss_per_token_slot" in logged
