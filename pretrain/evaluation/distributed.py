"""Data parallelism for evaluation: which share of the requests this process scores, and the
exchange that gives every process all results.

The harness's own data parallelism (sharding documents by rank and gathering metrics) would make
the aggregation order depend on the number of processes; ours shards requests instead, so every
process runs the harness on the complete, identically ordered results of one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    rank: int
    size: int
    group: object = None
    """The process group of the replicas (None: the default group)."""

    @classmethod
    def single(cls) -> DataParallel:
        return cls(0, 1)

    @classmethod
    def from_environment(cls, group=None) -> DataParallel:
        """The default group under torchrun (initialised here when needed: gloo on CPU, NCCL on
        GPU), else a single process."""
        if group is not None:
            return cls(dist.get_rank(group), dist.get_world_size(group), group)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
            return cls.single()
        if not dist.is_initialized():
            import torch

            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_dict(self, local: dict) -> dict:
        """The union of every rank's dict, on every rank."""
        if self.size == 1:
            return dict(local)
        parts: list = [None] * self.size
        dist.all_gather_object(parts, local, group=self.group)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged
