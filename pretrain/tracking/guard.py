"""Tracking that cannot stop training: every MLflow call is bounded in time.

MLflow's client retries a failing request for minutes (an unreachable server: ~4 min) and waits
on a silent one for as long as its socket time-out, or forever when a server accepts the
connection and never answers. So each call (opening the run included) runs on a worker thread
and the trainer waits for it at most `tracking.startup_timeout_s` / `tracking.timeout_s`.

On the first failure or time-out, `tracking.on_error` decides:

- `warn` (default): one line says what failed and where the metrics go from then on, and every
  later call writes to `<run dir>/metrics.jsonl` instead (one JSON object per line, with the
  failed call's own data), so nothing is lost and training never waits for MLflow again;
- `fail`: a one-line `TrackingError` stops the run.

A call that timed out may still be stuck inside MLflow: its thread is a daemon that is simply
abandoned (it cannot block the exit), and nothing is sent to MLflow after it.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pretrain.errors import TrackingError

LOCAL_METRICS = "metrics.jsonl"


class _Worker:
    """One daemon thread running submitted calls in order."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="dlm-tracking", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller, which decides
                box["error"] = exc
            done.set()

    def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """`fn()`'s result; raises its exception, or `TimeoutError` after `timeout` seconds."""
        box: dict[str, Any] = {}
        done = threading.Event()
        self._jobs.put((fn, box, done))
        if not done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class GuardedTracker:
    """A `Tracker` whose MLflow calls (via `open_run`, which returns an `MlflowTracker`) each
    take at most their time-out; after a failure, metrics go to a local JSONL file."""

    def __init__(
        self,
        open_run: Callable[[], Any],
        *,
        uri: str,
        local_dir: Path,
        startup_timeout_s: float,
        timeout_s: float,
        on_error: str,
        say: Callable[[str], None] = print,
    ):
        self.uri = uri
        self.run_id: str | None = None
        self.local_file = Path(local_dir) / LOCAL_METRICS
        self._timeout = timeout_s
        self._on_error = on_error
        self._say = say
        self._worker: _Worker | None = _Worker()
        self._inner = None
        self._inner = self._call("open the run", open_run, startup_timeout_s, None)
        if self._inner is not None:
            self.run_id = self._inner.run_id

    @property
    def failed(self) -> bool:
        """True once MLflow failed: everything goes to `local_file` from then on."""
        return self._worker is None

    def _call(self, what: str, fn: Callable[[], Any], timeout: float, local: dict | None):
        if self._worker is not None:
            try:
                return self._worker.call(fn, timeout)
            except Exception as exc:
                self._worker = None  # possibly stuck in MLflow: abandoned, never used again
                if self._on_error == "fail":
                    raise TrackingError(
                        f"tracking.uri {self.uri}: MLflow could not {what} ({_reason(exc)}); "
                        "set tracking.on_error=warn to train on without it"
                    ) from None
                self._say(
                    f"[dlm] warning: MLflow at {self.uri} could not {what} ({_reason(exc)}); "
                    f"training goes on, metrics are written to {self.local_file} from now on"
                )
        if local is not None:
            self.local_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.local_file, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **local}) + "\n")
        return None

    def log_params(self, params: dict[str, Any]) -> None:
        data = {k: str(v) for k, v in params.items()}
        self._call(
            "log params", lambda: self._inner.log_params(params), self._timeout, {"params": data}
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self._call(
            "log metrics",
            lambda: self._inner.log_metrics(values, step),
            self._timeout,
            {"step": step, "metrics": values},
        )

    def log_artifact(self, path: str | Path) -> None:
        self._call(
            "log an artifact",
            lambda: self._inner.log_artifact(path),
            self._timeout,
            {"artifact": str(path)},
        )

    def finish(self, status: str = "FINISHED") -> None:
        """Never raises (it runs while the trainer unwinds): a failure is one warning line."""
        if self._worker is None:
            return
        try:
            self._worker.call(lambda: self._inner.finish(status), self._timeout)
        except Exception as exc:
            self._worker = None
            self._say(f"[dlm] warning: MLflow at {self.uri} could not end the run ({_reason(exc)})")
