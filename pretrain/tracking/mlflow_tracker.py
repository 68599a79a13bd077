"""Experiment tracking with MLflow, on rank 0 only (every other rank gets a `NullTracker`).

The store is, in order: `tracking.uri` from the config, `$MLFLOW_TRACKING_URI`, or a local SQLite
store `sqlite:///<output_dir>/mlflow.db` shared by all runs under that output directory (so they
can be compared), with artifacts next to it in `<output_dir>/mlartifacts/`. A resumed run keeps
logging into its original MLflow run: the run id travels in the checkpoint. Every MLflow call is
bounded in time, and a failure never has to stop training (`guard.py`, `tracking.on_error`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    run_id: str | None
    uri: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id = None
    uri = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path):
        pass

    def finish(self, status="FINISHED"):
        pass


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class MlflowTracker:
    """Thin layer over `MlflowClient` (not the fluent API: no process-global active run)."""

    def __init__(
        self,
        *,
        uri: str,
        experiment: str,
        run_name: str,
        artifact_root: Path | None,
        run_id: str | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_root.resolve().as_uri() if artifact_root else None
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def create_tracker(
    *,
    enabled: bool,
    is_main: bool,
    uri: str | None,
    experiment: str,
    run_name: str,
    output_dir: str | Path,
    run_id: str | None = None,
    startup_timeout_s: float = 60.0,
    timeout_s: float = 15.0,
    on_error: str = "warn",
    say=print,
) -> Tracker:
    """The run's tracker: MLflow on the main rank (each call bounded by the time-outs, see
    `GuardedTracker`), a `NullTracker` elsewhere or when tracking is off."""
    if not (enabled and is_main):
        return NullTracker()
    import mlflow.tracking  # noqa: F401 - imported here: the import is slow, never a hang

    from pretrain.tracking.guard import GuardedTracker

    resolved = resolve_tracking_uri(uri, output_dir)
    local = resolved.startswith(("sqlite:", "file:")) or "://" not in resolved
    artifact_root = Path(output_dir) / "mlartifacts" if local else None
    return GuardedTracker(
        lambda: MlflowTracker(
            uri=resolved,
            experiment=experiment,
            run_name=run_name,
            artifact_root=artifact_root,
            run_id=run_id,
        ),
        uri=resolved,
        local_dir=Path(output_dir) / run_name,
        startup_timeout_s=startup_timeout_s,
        timeout_s=timeout_s,
        on_error=on_error,
        say=say,
    )
