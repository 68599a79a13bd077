"""MLflow tracking against a real `mlflow server` on 127.0.0.1, and the default local store."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, tiny_overrides

from pretrain.config import load_config
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"
TRAIN_METRICS = ["loss", "lr", "grad_norm", "tokens_per_s", "masked_fraction", "ce_masked"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed in the teardown
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--workers", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.close()
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


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
