"""When to checkpoint: every `train.checkpoint_interval` steps and every `train.checkpoint_minutes`.

A save is collective, so every rank must decide to save at the same step. A step count is the
same everywhere; wall clocks are not (each rank starts its clock at its own moment, and steps end
at slightly different times on each). So the time rule is voted on at every step: each rank
says whether its own clock has passed the interval since its last save, and one all-reduce (MAX,
over a gloo group of its own: the flag is host data and must not wait for the device) tells every
rank whether any has. All ranks then save at that step and restart their clocks. The vote costs
one 4-byte host all-reduce per step, and only when `checkpoint_minutes` is set.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist


class SaveSchedule:
    """`due(step)` (collective when `minutes` > 0): True when step `step` must be saved."""

    clock: Callable[[], float] = staticmethod(time.monotonic)
    """Seconds, monotonic; replaced by tests that need clocks which disagree across ranks."""

    def __init__(self, interval: int, minutes: float) -> None:
        self.interval = interval
        self.seconds = minutes * 60.0
        self._last = self.clock()
        self._group = None

    def due(self, step: int) -> bool:
        """Call at the end of every step, on every rank (the vote is a collective)."""
        by_steps = bool(self.interval) and step % self.interval == 0
        if not self.seconds:
            return by_steps
        now = self.clock()
        by_time = self._anyone(now - self._last >= self.seconds)
        if by_steps or by_time:
            self._last = now
        return by_steps or by_time

    def _anyone(self, mine: bool) -> bool:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return mine
        if self._group is None:  # created at the first vote, which every rank makes at once
            self._group = dist.new_group(backend="gloo")
        flag = torch.tensor([int(mine)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
