"""Guards on the training signal, checked where the host reads the metrics anyway.

* Non-finite losses and gradients (`train.on_nonfinite`). `stop`: at the next log, eval or
  checkpoint boundary (a step's metrics are read there, so no extra device sync) a non-finite
  loss or gradient norm ends the run with one line, before any checkpoint is written: the last
  complete checkpoint stays the last good one. `skip`: the fused optimizer decides on the device,
  every step, and leaves parameters and moments untouched when the gradient norm is not finite
  (`MasterWeightAdamW(skip_nonfinite=True)`); the count is logged.
* Loss spikes: a step whose loss is more than `train.spike_zscore` standard deviations above the
  mean of the previous `train.spike_window` steps, counted and logged (MLflow `train/loss_spikes`,
  `train/loss_zscore_max`).
"""

from __future__ import annotations

import math
from collections import deque

from pretrain.errors import TrainingError


class NonFiniteGuard:
    def __init__(self, mode: str, *, checkpoints_dir):
        self.mode = mode
        self.checkpoints_dir = checkpoints_dir

    def check(self, losses: dict[int, float], grad_norm: float | None, *, last_good) -> None:
        """Raise in `stop` mode if a resolved step's loss, or the latest gradient norm, is not
        finite. `last_good`: the newest complete checkpoint (named in the message)."""
        if self.mode != "stop":
            return
        bad = sorted(step for step, loss in losses.items() if not math.isfinite(loss))
        if bad:
            what, step = f"loss {losses[bad[0]]}", bad[0]
        elif grad_norm is not None and not math.isfinite(grad_norm):
            what, step = f"gradient norm {grad_norm}", max(losses, default=0)
        else:
            return
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint yet"
        raise TrainingError(
            f"step {step}: non-finite {what}; stopped before writing a checkpoint ({where}; "
            "lower optim.lr, or train.on_nonfinite=skip skips such steps)"
        )


class SpikeDetector:
    def __init__(self, zscore: float, window: int):
        self.zscore = zscore
        self.history: deque[float] = deque(maxlen=window)
        self.spikes = 0
        self._zmax = 0.0

    def update(self, losses: dict[int, float]) -> list[tuple[int, float]]:
        """Feed resolved per-step losses (in step order); returns the spikes among them as
        (step, z-score)."""
        found = []
        for step in sorted(losses):
            loss = losses[step]
            if not math.isfinite(loss):
                continue
            if len(self.history) >= 10:
                mean = sum(self.history) / len(self.history)
                std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
                z = (loss - mean) / max(std, 1e-8)
                self._zmax = max(self._zmax, z)
                if z > self.zscore:
                    self.spikes += 1
                    found.append((step, z))
            self.history.append(loss)
        return found

    def metrics(self) -> dict[str, float]:
        """For the log line: spikes so far and the largest z-score since the last call."""
        out = {"train/loss_spikes": float(self.spikes), "train/loss_zscore_max": self._zmax}
        self._zmax = 0.0
        return out
