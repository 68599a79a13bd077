"""MLflow tracking against a real `mlflow server` on 127.0.0.1, and the default local store."""

from __future__ import annotations

import pytest
from conftest import REPO, start_mlflow_server, stop_mlflow_server, tiny_overrides

from pretrain.config import load_config
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"
TRAIN_METRICS = ["loss", "lr", "grad_norm", "tokens_per_s", "masked_fraction", "ce_masked"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_mlflow_server(proc)


def test_run_is_tracked_on_a_real_server_and_resume_continues_it(
    runtime, demo_data, tmp_path, mlflow_server
):
    import mlflow
    from mlflow.tracking import MlflowClient

    overrides = tiny_overrides(
        demo_data,
        tmp_path,
        "tracked",
        **{
            "tracking.enabled": True,
            "tracking.uri": mlflow_server,
            "tracking.experiment": "server-test",
            "train.steps": 10,
        },
    )
    first = train(load_config(TINY, overrides), stop_at=4)
    second = train(load_config(TINY, overrides))
    assert first.run_id == second.run_id is not None

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["server-test"])
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["status"] == "FINISHED" and row["tags.mlflow.runName"] == "tracked"
    for name in TRAIN_METRICS + ["val/nelbo_per_token_slot", "val/ce_masked"]:
        assert f"metrics.{name}" in runs.columns, name
    assert row["params.model.hidden_size"] == "64"
    assert row["params.diffusion.schedule"] == "linear"
    # the last logged loss is the mean over its logging window (steps 9 and 10)
    assert row["metrics.loss"] == pytest.approx((second.losses[9] + second.losses[10]) / 2)

    client = MlflowClient(tracking_uri=mlflow_server)
    history = client.get_metric_history(first.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6, 8, 10]  # one series across the resume
    assert {a.path for a in client.list_artifacts(first.run_id)} >= {"config.yaml"}
    assert all(m.value > 0 for m in client.get_metric_history(first.run_id, "tokens_per_s"))


def test_default_store_is_sqlite_under_the_output_dir(runtime, demo_data, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = tiny_overrides(
        demo_data, tmp_path, "local", **{"tracking.enabled": True, "train.steps": 4}
    )
    result = train(load_config(TINY, overrides))
    assert result.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(result.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["dlm-pretrain"])
    assert list(runs["run_id"]) == [result.run_id]
    assert runs.iloc[0]["metrics.loss"] == pytest.approx((result.losses[3] + result.losses[4]) / 2)
    assert (tmp_path / "mlartifacts").is_dir()


def test_env_tracking_uri_is_honoured(runtime, demo_data, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = tiny_overrides(demo_data, tmp_path, "env", **{"tracking.enabled": True})
    result = train(load_config(TINY, [*overrides, "train.steps=2"]))
    assert result.tracking_uri == uri and (tmp_path / "from-env.db").is_file()
