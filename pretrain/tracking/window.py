"""Training metrics between two log lines, left on the device until the host needs them."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from pretrain.parallel.engine import host_metrics


class MetricWindow:
    """The per-step metrics of the steps since the last log line.

    Reading a metric on the host waits for the GPU to finish the step. So a step's metrics stay
    0-dim device tensors until a step that `resolve`s them: the trainer resolves at the steps
    where the host must wait anyway (a log line, an evaluation, a checkpoint, a probe, the end),
    and in between the host queues the next step while the GPU still runs the last one.

    A step's time is the host's wall clock from its start; at a resolving step it includes the
    wait for the GPU, so the times of a window add up to its real duration.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, dict[str, torch.Tensor | float]]] = []
        self._sums: dict[str, float] = defaultdict(float)
        self._seconds = 0.0
        self._steps = 0

    def add(
        self, step: int, metrics: dict[str, torch.Tensor | float], *, started: float, resolve: bool
    ) -> dict[int, float]:
        """Record `step`'s metrics; with `resolve`, bring every pending step's to the host.

        Returns the loss of each step resolved by this call ({} without `resolve`).
        """
        self._pending.append((step, metrics))
        losses = self._resolve() if resolve else {}
        self._seconds += time.perf_counter() - started
        self._steps += 1
        return losses

    def _resolve(self) -> dict[int, float]:
        losses = {}
        for step, metrics in self._pending:
            values = host_metrics(metrics)  # the first waits for the GPU; the rest are copies
            losses[step] = values["loss"]
            for name, value in values.items():
                self._sums[name] += value
        self._pending = []
        return losses

    def means(self) -> dict[str, float]:
        """Means over the window's steps (all resolved), `step_time_s` included; then reset."""
        if self._pending:
            raise RuntimeError("MetricWindow.means: resolve the pending steps first")
        out = {name: value / self._steps for name, value in self._sums.items()}
        out["step_time_s"] = self._seconds / self._steps
        self.__init__()
        return out
