"""Preemption: stop at a step boundary on SIGTERM/SIGUSR1, checkpoint, and ask to be requeued.

Slurm warns a job before its time limit with SIGUSR1 (`--signal=B:USR1@N`, forwarded by the
batch script and torchrun) and preempts or requeues it with SIGTERM (then SIGKILL after
`KillWait`). The handler only sets a flag: the step in flight finishes, then every rank agrees
(an all-reduce of the flag, so a signal seen by one rank stops all of them at the *same* step),
the trainer writes a checkpoint and `dlm train` exits with `REQUEUE_EXIT_CODE`. The next start
resumes from that checkpoint (`train.resume: auto`), so nothing is lost.

Rank 0 also writes `<run_dir>/PREEMPTED` (the step, as JSON): the generated sbatch script
requeues the job when it finds that marker after its `srun` returns (torchrun folds its workers'
exit codes into its own, so a file is the reliable channel).
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from types import FrameType

REQUEUE_EXIT_CODE = 75
"""`EX_TEMPFAIL` (sysexits.h): a temporary failure, run me again."""
PREEMPTED_MARKER = "PREEMPTED"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """Turns stop signals into a flag that the training loop checks at step boundaries.

    Usage (the trainer): `guard = PreemptionGuard.install()`, after each step
    `if guard.should_stop(): <checkpoint>; break`, finally `guard.uninstall()`.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        """The signal number that arrived first, or None."""
        self._previous: dict[int, object] = {}
        self._host_group = None  # the process group should_stop() reduces over (gloo)

    @classmethod
    def install(cls) -> PreemptionGuard:
        guard = cls()
        for sig in STOP_SIGNALS:
            # Outside the main thread signals cannot be caught; the guard then never fires.
            with contextlib.suppress(ValueError):
                guard._previous[sig] = signal.signal(sig, guard._handle)
        return guard

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            # Printed from the handler on purpose: the log shows when the signal arrived.
            print(f"[dlm] got {signal.Signals(signum).name}: stopping after this step", flush=True)

    def should_stop(self) -> bool:
        """Collective under torch.distributed: True on every rank if any rank got a signal.

        One all-reduce of one integer per step, on the host: the flag is host data, and an NCCL
        all-reduce of it would make the host wait for the GPU's queued step every step (a
        `.item()` on a device tensor). So the flag goes through a gloo group of its own over the
        same ranks (whatever the default backend), created at the first call, which every rank
        makes at the same step.
        """
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if self._host_group is None:
                self._host_group = dist.new_group(backend="gloo")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host_group)
        return bool(flag.item())

    def mark_preempted(self, run_dir: Path, step: int, *, is_main: bool) -> int:
        """After the checkpoint of `step`: rank 0 leaves the marker the sbatch script looks for."""
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": step}) + "\n")
        # No rank exits before the marker exists: torchrun tears a job down when its first
        # worker exits non-zero, and the marker is what tells the launcher to requeue.
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        return step


def clear_marker(run_dir: Path) -> None:
    (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
