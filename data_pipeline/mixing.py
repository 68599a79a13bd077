"""Per-source order and weighted mixing of several sources, all as pure functions of positions.

Nothing here keeps a random generator: every choice is a splitmix64 hash of a seeded counter, so
the item at any position can be computed directly (seek without reading) and the order is stable
across numpy/torch versions, which a resumed run relies on.

- **Source order.** Source item ``k`` lies in epoch ``e = k // n``; epoch ``e`` visits the shards in
  an order permuted by ``(seed, e)`` and the samples of shard ``j`` in an order permuted by
  ``(seed, e, j)``. This is webdataset's shard shuffling plus a shuffle buffer of one whole
  shard, made exactly addressable.
- **Mixing.** Global position ``p`` belongs to source ``s`` when
  ``u_p = (h(seed) + p * phi) mod 2**64`` falls into ``s``'s slice ``[W_{s-1}, W_s)`` of the
  cumulative weights (a Weyl sequence with the golden ratio ``phi``). Its points are evenly spread,
  so any window of N positions holds each source in proportion ``w_s`` up to ``O(log N / N)``,
  unlike independent draws whose error is ``O(1/sqrt N)``; ``h(seed)`` decorrelates seeds.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.errors import DataError

log = logging.getLogger("dlm.data")

_PHI64 = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd


def key_hash(*key: object) -> int:
    """A 64-bit integer determined only by ``key``."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser applied elementwise to uint64 ``z`` (wraps mod 2**64, as intended)."""
    with np.errstate(over="ignore"):
        z = z + _PHI64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined only by ``key`` (platform- and version-stable)."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(key_hash(*key))
    return np.argsort(splitmix(z), kind="stable")


def position_hash(seed: int, salt: str, positions: np.ndarray) -> np.ndarray:
    """uint64 hash of each global position, independent per ``(seed, salt)``."""
    with np.errstate(over="ignore"):
        return splitmix(positions.astype(np.uint64) ^ np.uint64(key_hash(seed, salt)))


@dataclass(frozen=True)
class Source:
    """One dataset directory in a mixture and its sampling weight (relative, any scale)."""

    path: str
    weight: float = 1.0
    shard_url: str | None = None
    """Optional shard location template with ``{name}``, e.g. ``pipe:aws s3 cp s3://b/{name} -``."""


class Mixture:
    """Which source each global position reads: ``source_of(positions)`` [n] int64."""

    def __init__(self, weights: Sequence[float], seed: int, where: str = "data.sources") -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise DataError(f"{where}: weights are {list(weights)}; expected positive numbers")
        self.weights = (w / w.sum()).tolist()
        # Upper ends of the sources' slices of [0, 2**64); the last one is open (all the rest).
        cum = np.cumsum(w / w.sum())[:-1]
        self._edges = np.array([min(int(c * 2.0**64), 2**64 - 1) for c in cum], dtype=np.uint64)
        self._offset = np.uint64(key_hash(seed, "mix"))

    def source_of(self, positions: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            u = positions.astype(np.uint64) * _PHI64 + self._offset
        return np.searchsorted(self._edges, u, side="right").astype(np.int64)


class SourceOrder:
    """The infinite, epoch-shuffled order of one split of one source, and its bad-shard policy.

    ``locate(k)`` maps source item ``k`` to ``(shard, row)`` without reading anything. With
    ``skip_bad``, a shard that fails to read is logged, counted and replaced, for the rest of the
    stream, by the next readable shard of the same epoch's order (same row modulo its size), so
    positions keep their meaning and a resumed run makes the same substitutions.
    """

    def __init__(self, counts: list[int], seed: int, name: str, *, skip_bad: bool) -> None:
        self.counts = counts
        self.n = sum(counts)
        self.seed = seed
        self.name = name
        self.skip_bad = skip_bad
        self.bad: dict[int, str] = {}  # shard index -> why it was skipped
        self._layouts: dict[int, tuple[np.ndarray, list[int]]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _layout(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        """Shard order of ``epoch`` and the first item offset of each shard in that order."""
        if epoch not in self._layouts:
            if len(self._layouts) >= 2:  # a batch spans at most two epochs at a time
                self._layouts.pop(min(self._layouts))
            order = permutation(len(self.counts), self.seed, epoch)
            starts = np.concatenate([[0], np.cumsum([self.counts[k] for k in order])[:-1]])
            self._layouts[epoch] = (order, starts.astype(np.int64).tolist())
        return self._layouts[epoch]

    def _row(self, epoch: int, shard: int, index: int) -> int:
        if (epoch, shard) not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[(epoch, shard)] = permutation(self.counts[shard], self.seed, epoch, shard)
        return int(self._perms[(epoch, shard)][index % self.counts[shard]])

    def locate(self, k: int) -> tuple[int, int]:
        """``(shard, row)`` of source item ``k``, skipping shards already known to be bad."""
        epoch, offset = divmod(k, self.n)
        order, starts = self._layout(epoch)
        j = bisect.bisect_right(starts, offset) - 1
        index = offset - starts[j]
        for step in range(len(order)):
            shard = int(order[(j + step) % len(order)])
            if shard not in self.bad:
                return shard, self._row(epoch, shard, index)
        raise DataError(f"{self.name}: every shard is unreadable; last: {self.bad[int(order[j])]}")

    def mark_bad(self, shard: int, error: DataError) -> None:
        """Record a failed shard (``skip_bad``) or re-raise the error naming it."""
        if not self.skip_bad:
            raise error
        self.bad[shard] = str(error)
        log.warning("skipping shard: %s", error)


def resolve_sources(sources: Sequence[Source | str | Path]) -> list[Source]:
    """Accept plain paths as weight-1 sources."""
    return [s if isinstance(s, Source) else Source(path=str(s)) for s in sources]
