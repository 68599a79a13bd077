"""Tracking that cannot stop training, against real sockets and real MLflow stores: a server
that refuses connections, one that accepts and never answers, a store that stops answering
mid-run, and a real `mlflow server` killed mid-run. Each costs at most one time-out; with
`tracking.on_error: warn` the run says so once and keeps its metrics in `metrics.jsonl`, with
`fail` it stops with one line."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time

import pytest
from conftest import (
    REPO,
    free_port,
    one_line_error,
    start_mlflow_server,
    stop_mlflow_server,
    tiny_overrides,
)

from pretrain.config import load_config
from pretrain.errors import TrackingError
from pretrain.tracking.guard import LOCAL_METRICS
from pretrain.tracking.mlflow_tracker import create_tracker
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"
SLACK_S = 5.0  # scheduling noise on a loaded 2-core machine


@pytest.fixture(autouse=True, scope="module")
def _mlflow_imported():
    import mlflow.tracking  # noqa: F401 - the first import is slow; time-outs are not about it


@pytest.fixture
def refused_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture
def silent_uri():
    """A server that accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn, _ in held:
        conn.close()


def _tracker(uri, out, on_error="warn", said=None):
    return create_tracker(
        enabled=True,
        is_main=True,
        uri=uri,
        experiment="faults",
        run_name="r",
        output_dir=out,
        startup_timeout_s=2.0,
        timeout_s=1.0,
        on_error=on_error,
        say=(said.append if said is not None else print),
    )


@pytest.mark.parametrize("server", ["refused_uri", "silent_uri"])
def test_an_unreachable_or_silent_server_costs_one_time_out(request, tmp_path, server):
    uri = request.getfixturevalue(server)
    said: list[str] = []
    started = time.monotonic()
    tracker = _tracker(uri, tmp_path, said=said)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    tracker.log_params({"a": 1})
    tracker.finish()
    assert time.monotonic() - started < 2.0 + SLACK_S  # one start-up time-out, then local
    assert len(said) == 1 and f"MLflow at {uri} could not open the run" in said[0], said
    assert str(tmp_path / "r" / LOCAL_METRICS) in said[0]
    lines = [json.loads(x) for x in (tmp_path / "r" / LOCAL_METRICS).read_text().splitlines()]
    assert [x.get("step") for x in lines] == [1, 2, 3, None]
    assert lines[0]["metrics"] == {"loss": 1.0} and lines[3]["params"] == {"a": "1"}


@pytest.mark.parametrize("server", ["refused_uri", "silent_uri"])
def test_fail_mode_stops_within_the_time_out_with_one_line(request, tmp_path, server):
    uri = request.getfixturevalue(server)
    started = time.monotonic()
    with pytest.raises(TrackingError) as info:
        _tracker(uri, tmp_path, on_error="fail")
    assert time.monotonic() - started < 2.0 + SLACK_S
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"tracking.uri {uri}: MLflow")
    assert "tracking.on_error=warn" in message


def test_a_run_against_a_silent_server_trains_on_and_keeps_its_metrics(
    runtime, demo_data, tmp_path, silent_uri, capsys
):
    overrides = tiny_overrides(
        demo_data,
        tmp_path,
        "silent",
        **{
            "tracking.enabled": True,
            "tracking.uri": silent_uri,
            "tracking.startup_timeout_s": 2,
            "tracking.timeout_s": 1,
        },
    )
    result = train(load_config(TINY, overrides))
    out = capsys.readouterr().out
    assert sorted(result.losses) == list(range(1, 9)) and result.run_id is None
    assert sum("warning: MLflow" in line for line in out.splitlines()) == 1, out
    lines = [json.loads(x) for x in (tmp_path / "silent" / LOCAL_METRICS).read_text().splitlines()]
    logged = {x["step"]: x["metrics"]["loss"] for x in lines if "loss" in x.get("metrics", {})}
    assert sorted(logged) == [2, 4, 6, 8]  # every logging step (train.log_interval 2)
    assert logged[8] == pytest.approx((result.losses[7] + result.losses[8]) / 2)
    assert any("params" in x for x in lines)


def test_fail_mode_run_ends_with_one_line_naming_the_uri(
    runtime, demo_data, tmp_path, refused_uri, capsys
):
    extra = {
        "tracking.enabled": True,
        "tracking.uri": refused_uri,
        "tracking.on_error": "fail",
        "tracking.startup_timeout_s": 2,
    }
    err = one_line_error(
        capsys, ["train", str(TINY), *tiny_overrides(demo_data, tmp_path, "failing", **extra)]
    )
    assert f"tracking.uri {refused_uri}: MLflow could not open the run" in err


def _wait_for_metrics(db, needed: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(db, timeout=0.1) as conn:
                if conn.execute("select count(*) from metrics").fetchone()[0] >= needed:
                    return
        except sqlite3.Error:
            pass  # not created yet
        time.sleep(0.05)
    raise AssertionError("no metrics reached the store")


def test_a_store_that_stops_answering_mid_run_costs_one_time_out(
    runtime, demo_data, tmp_path, capsys
):
    """MLflow's SQLite store is locked by another connection after the first metrics: the next
    logging call waits inside MLflow; the trainer waits 1 s for it and trains on locally."""
    db = tmp_path / "mlflow.db"
    extra = {
        "tracking.enabled": True,
        "tracking.uri": f"sqlite:///{db}",
        "tracking.timeout_s": 1,
        "train.steps": 100,
    }
    overrides = tiny_overrides(demo_data, tmp_path, "locked", **extra)
    release = threading.Event()

    locked_at = {}

    def lock_the_store():
        _wait_for_metrics(db, 1)
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        conn.execute("begin exclusive")  # every MLflow write now waits for us
        locked_at["t"] = time.time()
        release.wait(300)
        conn.execute("rollback")
        conn.close()

    locker = threading.Thread(target=lock_the_store, daemon=True)
    locker.start()
    try:
        result = train(load_config(TINY, overrides))
    finally:
        release.set()
        locker.join(60)
    out = capsys.readouterr().out
    assert sorted(result.losses) == list(range(1, 101))
    warnings = [line for line in out.splitlines() if "warning: MLflow" in line]
    assert len(warnings) == 1 and "could not log" in warnings[0], out
    lines = [json.loads(x) for x in (tmp_path / "locked" / LOCAL_METRICS).read_text().splitlines()]
    assert lines[-1]["step"] == 100  # the rest of the run, kept locally
    assert lines[0]["time"] - locked_at["t"] < 1.0 + SLACK_S  # one time-out, then no waiting


@pytest.mark.slow
def test_a_server_killed_mid_run_costs_one_time_out(runtime, demo_data, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    proc, uri = start_mlflow_server(tmp_path)
    extra = {"tracking.enabled": True, "tracking.uri": uri, "tracking.timeout_s": 2}
    overrides = tiny_overrides(demo_data, tmp_path, "killed", **{**extra, "train.steps": 300})
    killed_at = {}

    def kill_after_first_metrics():
        client = MlflowClient(tracking_uri=uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()], max_results=1
                )
                if runs and runs[0].data.metrics:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        stop_mlflow_server(proc, signal.SIGKILL)  # the server and its workers, at once
        killed_at["t"] = time.time()

    killer = threading.Thread(target=kill_after_first_metrics, daemon=True)
    killer.start()
    try:
        result = train(load_config(TINY, overrides))
    finally:
        killer.join(300)
        if "t" not in killed_at:
            stop_mlflow_server(proc, signal.SIGKILL)
    out = capsys.readouterr().out
    assert "t" in killed_at and sorted(result.losses) == list(range(1, 301))
    warnings = [line for line in out.splitlines() if "warning: MLflow" in line]
    assert len(warnings) == 1 and f"MLflow at {uri} could not log" in warnings[0], out
    lines = [json.loads(x) for x in (tmp_path / "killed" / LOCAL_METRICS).read_text().splitlines()]
    assert lines[-1]["step"] == 300
    # the call that met the dead server gave up after its time-out; the rest was local
    assert lines[0]["time"] - killed_at["t"] < 2.0 + SLACK_S
