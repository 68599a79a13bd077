"""One trainer per run: an exclusive lock on `<run_dir>/run.lock`, held for the whole run.

Two trainers on one run would write the same checkpoints and log into the same MLflow run; the
second one therefore stops at once, naming the holder (host, pid, start time), which the holder
writes into the lock file. The lock is the kernel's: it is released when the holding process
exits, however it exits (SIGKILL included), so a crashed run never leaves a stale lock behind.
It is a POSIX record lock (`fcntl.lockf`) rather than a `flock`: a `flock` is shared with every
forked child (DataLoader workers), which would keep holding it after the trainer died, while a
record lock belongs to the process alone.

Only global rank 0 locks. A run directory must be on a filesystem that every node sees (rank 0
seals the files every rank writes), so one lock covers the whole job, and the job's other ranks
learn the outcome from rank 0 (a broadcast) and fail with the same line. A lock per node (one
rank on each node locking the same file) would make the nodes of one job exclude each other, and
a run directory that is not shared cannot hold sealed checkpoints in the first place. Record
locks work across hosts on NFS (v4, or v3 with lockd) and on Lustre mounted with `-o flock`;
where the filesystem refuses file locks, the run starts with a one-line warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from pretrain.errors import CheckpointError

LOCK_FILE = "run.lock"
_HELD: dict[Path, RunLock] = {}
"""Run locks this process holds, by resolved run directory."""


class RunLock:
    """A held (or, on ranks other than 0, a merely acknowledged) run lock."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir = run_dir
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (also happens when the process exits)."""
        if self._fd is not None:
            _HELD.pop(self.run_dir, None)
            os.close(self._fd)  # closing the file releases the process's record lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holds_run_lock(run_dir: str | Path) -> bool:
    """True when this process holds the lock of `run_dir`."""
    return Path(run_dir).resolve() in _HELD


def _holder(fd: int) -> str:
    raw = os.pread(fd, 4096, 0)
    try:
        info = json.loads(raw)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: it is starting or wrote no details"


def _try_lock(run_dir: Path, say=print) -> tuple[int | None, str | None]:
    """(descriptor, None) when locked, (None, error) when another process holds the lock,
    (None, None) when the filesystem has no file locks (warned)."""
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC: it names the holder
    except OSError as exc:
        return None, f"{path}: cannot open the run lock ({exc.strerror or exc})"
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(fd)
            os.close(fd)
            return None, (
                f"{run_dir}: another trainer is running this run ({holder}; lock {path}); "
                "wait for it to end or stop it, or choose another run.name"
            )
        os.close(fd)
        say(
            f"[dlm] warning: {path}: the filesystem refuses file locks ({exc.strerror}); a "
            "second trainer on this run would not be stopped"
        )
        return None, None
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd, None


def acquire_run_lock(run_dir: str | Path, rank: int, *, say=print) -> RunLock:
    """Lock `run_dir` for this job, or raise `CheckpointError` naming the holder.

    Collective under torch.distributed: every rank calls it; rank 0 takes the lock and the
    others learn whether it did, so all of them fail together. A process that already holds
    the lock (a second `train()` in the same process) gets it back.
    """
    run_dir = Path(run_dir).resolve()
    error = None
    lock = RunLock(run_dir, None)
    if rank == 0:
        if run_dir in _HELD:
            lock = _HELD[run_dir]
        else:
            fd, error = _try_lock(run_dir, say)
            lock = RunLock(run_dir, fd)
            if fd is not None:
                _HELD[run_dir] = lock
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise CheckpointError(error)
    return lock
