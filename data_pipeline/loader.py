"""Reading with ``torch.utils.data.DataLoader`` worker processes, keeping the exact stream.

Worker ``w`` of ``N`` produces this rank's batches ``w, w+N, w+2N, ...`` (counted from the state
the loader was started from), and the DataLoader hands batches out round-robin over workers, so
the main process sees exactly the single-process sequence. The main process tracks the state by
advancing a shadow stream one global batch per batch it hands out (no shard is read for that), so
prefetched but unconsumed batches never leak into a checkpoint, and a resume may use any number
of workers.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.reader import TokenBatch, TokenBlockStream


def _ignore_stop_signals(_worker: int) -> None:
    """Workers outlive a scheduler's stop signal (slurm signals every process of a job step):
    the trainer finishes its step and checkpoints, then its exit ends them. A worker killed by
    the signal would make the DataLoader abort the trainer mid-step instead."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class _Shard(IterableDataset):
    """What one worker iterates: every N-th batch of the stream, from a given state."""

    def __init__(self, kwargs: dict[str, Any], state: dict[str, Any]) -> None:
        self.kwargs, self.state = kwargs, state

    def __iter__(self) -> Iterator[TokenBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream = TokenBlockStream(**self.kwargs)
        stream.load_state_dict(self.state)
        stream.skip_batches(worker)
        while True:
            yield stream.next_batch()
            stream.skip_batches(workers - 1)


class LoaderStream(Iterator[torch.Tensor]):
    """A :class:`TokenBlockStream` read by ``num_workers`` processes; same interface and stream.

    ``num_workers=0`` reads in the calling process. ``prefetch`` batches per worker are read ahead.
    """

    def __init__(self, *, num_workers: int = 0, prefetch: int = 2, **kwargs: Any) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers is {num_workers}; expected >= 0")
        self.kwargs = kwargs
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.shadow = TokenBlockStream(**kwargs)  # validates everything up front, in this process
        self.manifest = self.shadow.manifest
        self.seq_len = self.shadow.seq_len
        self._it: Iterator[TokenBatch] | None = None
        self._skipped: int = 0

    def _start(self) -> Iterator[TokenBatch]:
        dataset = _Shard(self.kwargs, self.shadow.state_dict())
        loader = DataLoader(
            dataset,
            batch_size=None,  # the stream already yields batches
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch if self.num_workers else None,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        )
        return iter(loader)

    def __iter__(self) -> LoaderStream:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch().tokens

    def next_batch(self) -> TokenBatch:
        if self.num_workers == 0:
            batch = self.shadow.next_batch()
        else:
            if self._it is None:
                self._it = self._start()
            batch = next(self._it)
            self.shadow.skip_batches(1)
        self._skipped = max(self._skipped, batch.skipped_shards)
        return batch

    @property
    def skipped_shards(self) -> int:
        """Bad shards skipped so far (the largest count any worker reported)."""
        return self._skipped

    def state_dict(self) -> dict[str, Any]:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow.load_state_dict(state)
        self._it = None  # workers restart from the new state on the next batch
