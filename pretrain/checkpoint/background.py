"""Saving off the training step: a host snapshot taken on the step, files written on a thread.

`train.checkpoint_async` splits a save (`CheckpointManager.save`) in two:

    on the training thread    wait for the previous save, the staging directory, the DP
                              gathers of the optimizer state (collective), copies of every
                              tensor into host buffers (`HostBuffers`; pinned, non-blocking on
                              CUDA), the records encoded as JSON text
    on a background thread    the shard and records written, hashed, the ranks' outcomes
                              exchanged over a gloo group of the checkpoint's own, then on rank 0
                              the marker, the rename, `latest` and pruning

so the step goes on while the bytes are written. What reaches the disk, and in what order, is
exactly what a synchronous save writes (the same function writes both), so atomicity holds as
before: a checkpoint without its marker is never `latest`, and `resume_point` skips it.

At most one save is in flight (`BackgroundWrite`): the next save waits for it first. Its failure
is kept and raised on the training thread at the next `poll` (every step) or `wait`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch


class HostBuffers:
    """Host copies of the tensors a checkpoint writes, reused from save to save.

    Reuse matters on CUDA, where the buffers are pinned (allocating pinned memory costs more than
    the copy) so the device-to-host copies are asynchronous: they are queued on the current
    stream, ahead of the next step's kernels, and `ready()` returns what the writer waits on
    before reading them. On the CPU the copy is what makes the snapshot: without it the writer
    would read the live optimizer state while the next step updates it. The buffers hold one
    host copy of this rank's shard of the state (3 x 4 bytes per parameter owned) between saves.
    Reusing them is safe because a save waits for the previous one before copying again.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._cuda = False

    def copy(self, key: str, value: torch.Tensor) -> torch.Tensor:
        value = value.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != value.shape:
            buf = torch.empty(value.shape, dtype=torch.float32, pin_memory=value.is_cuda)
            self._buffers[key] = buf
        buf.copy_(value, non_blocking=value.is_cuda)
        self._cuda |= value.is_cuda
        return buf

    def ready(self) -> Callable[[], None]:
        """What to call before reading the buffers: waits for the copies queued so far."""
        if not self._cuda:
            return lambda: None
        event = torch.cuda.Event()
        event.record()  # on the stream the copies were queued on
        return event.synchronize


class BackgroundWrite:
    """At most one function running on a thread of its own; its exception is kept until the
    training thread asks (`check`, `wait`), so a failed write is never lost."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.what: str | None = None
        """What is in flight (e.g. 'step_00000200'), for the wait note."""

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def submit(self, fn: Callable[[], None], what: str) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is already in flight (wait() first)")
        self.what = what
        # Not a daemon: an interpreter exiting with a write in flight finishes it first.
        self._thread = threading.Thread(target=self._run, args=(fn,), name="dlm-checkpoint")
        self._thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # kept for the training thread, raised there
            self._error = exc

    def check(self) -> None:
        """Raise the failure of a write that has finished; nothing while one is running."""
        if self._thread is not None and not self._thread.is_alive():
            self._join()

    def wait(self) -> float:
        """Wait for the write in flight (raising its failure); returns the seconds waited."""
        if self._thread is None:
            return 0.0
        start = time.perf_counter()
        self._thread.join()
        waited = time.perf_counter() - start
        self._join()
        return waited

    def _join(self) -> None:
        self._thread.join()
        self._thread, self.what = None, None
        error, self._error = self._error, None
        if error is not None:
            raise error
