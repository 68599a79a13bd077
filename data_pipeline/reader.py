"""Deterministic, resumable, data-parallel reading of a built dataset.

The stream is defined on *global* positions so that it does not depend on the number of
data-parallel ranks: epoch ``e`` visits the shards in an order permuted by ``(seed, e)`` and the
samples of shard ``k`` in an order permuted by ``(seed, e, k)``; epochs are concatenated into one
infinite sequence of items. Global batch ``b`` is items ``[b*G, (b+1)*G)`` with
``G = batch_size * dp_size`` and rank ``r`` takes the ``r``-th slice of ``batch_size`` items. A
checkpoint therefore stores one position that is valid for any later ``dp_size`` with the same
global batch, and resuming only needs the manifest's per-shard counts (no skipped shard is read).

Permutations use a splitmix64 hash of a seeded counter rather than numpy/torch generators, whose
streams are not guaranteed stable across library versions; a resumed run must see the same order.
"""

from __future__ import annotations

import bisect
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipeline.manifest import MANIFEST_FILE, Manifest
from pretrain.errors import ConfigError, DataError

STATE_VERSION = 1
_M64 = (1 << 64) - 1


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined only by ``key`` (platform- and version-stable)."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    base = int.from_bytes(digest, "little")
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(base)  # wraps mod 2**64, as intended
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.argsort(z, kind="stable")


def read_shard(
    data_dir: str | Path,
    manifest: Manifest,
    split: str,
    shard: int,
    *,
    verify_checksum: bool = True,
) -> np.ndarray:
    """Decode shard ``shard`` of ``split`` into a ``[num_samples, seq_len]`` array (manifest dtype).

    Every check names the shard and the manifest, because the user's fix (rebuild, re-copy) is
    per file: missing file, checksum, tar structure, members, lengths, counts and id range.
    """
    data_dir = Path(data_dir)
    info = manifest.splits[split][shard]
    path = data_dir / info.name
    listed = f"listed in {data_dir / MANIFEST_FILE}"
    if not path.is_file():
        raise DataError(f"{path}: shard is missing; {listed}")
    raw = path.read_bytes()
    if verify_checksum:
        got = hashlib.sha256(raw).hexdigest()
        if got != info.sha256:
            raise DataError(
                f"{path}: sha256 is {got[:16]}... but the manifest says "
                f"{info.sha256[:16]}...; the shard is corrupt or modified; {listed}"
            )
    try:
        source = [{"url": str(path), "stream": io.BytesIO(raw)}]
        samples = list(group_by_keys(tar_file_expander(source)))
    except Exception as exc:  # tarfile.ReadError, EOFError, ValueError (duplicate member), ...
        detail = " ".join(str(exc.args[0] if exc.args else "").split())  # keep it one line
        raise DataError(
            f"{path}: corrupt or truncated tar ({type(exc).__name__}: {detail}); {listed}"
        ) from exc
    if len(samples) != info.num_samples:
        raise DataError(
            f"{path}: has {len(samples)} samples but the manifest says "
            f"{info.num_samples} (truncated or replaced?); {listed}"
        )
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    nbytes = manifest.seq_len * manifest.itemsize
    out = np.empty((len(samples), manifest.seq_len), dtype=dtype)
    for i, sample in enumerate(samples):
        data = sample.get("tok")
        if data is None:
            members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
            raise DataError(
                f"{path}: sample {sample['__key__']} has no 'tok' member (has: {members}); {listed}"
            )
        if len(data) != nbytes:
            raise DataError(
                f"{path}: sample {sample['__key__']} has {len(data)} bytes; expected "
                f"seq_len {manifest.seq_len} x {manifest.itemsize} = {nbytes}; {listed}"
            )
        out[i] = np.frombuffer(data, dtype=dtype)
    vocab = manifest.tokenizer.vocab_size
    if out.size and int(out.max()) >= vocab:
        row = int(np.argmax(out.max(axis=1) >= vocab))
        raise DataError(
            f"{path}: sample {samples[row]['__key__']} holds token id "
            f"{int(out[row].max())} >= tokenizer.vocab_size {vocab}; {listed}"
        )
    return out


class _ShardCache:
    """Holds the decoded blocks of at most one shard (the one being read)."""

    def __init__(self, data_dir: Path, manifest: Manifest, split: str, verify: bool) -> None:
        self._args = (data_dir, manifest, split)
        self._verify = verify
        self._index: int | None = None
        self._blocks: np.ndarray | None = None

    def get(self, shard: int) -> np.ndarray:
        if shard != self._index or self._blocks is None:
            self._blocks = None  # drop the old shard before decoding the next one
            self._blocks = read_shard(*self._args, shard, verify_checksum=self._verify)
            self._index = shard
        return self._blocks


def _open(data_dir: str | Path, split: str) -> tuple[Path, Manifest, int]:
    data_dir = Path(data_dir)
    manifest = Manifest.load(data_dir)
    if split not in manifest.splits:
        raise DataError(
            f"{data_dir / MANIFEST_FILE}: has no split '{split}'; splits: "
            f"{', '.join(manifest.splits)}"
        )
    n = manifest.num_samples(split)
    if n == 0:
        raise DataError(f"{data_dir / MANIFEST_FILE}: split '{split}' has no samples")
    # Fail at start rather than hours in, when the stream first reaches a missing shard.
    for info in manifest.splits[split]:
        if not (data_dir / info.name).is_file():
            raise DataError(
                f"{data_dir / info.name}: shard is missing; listed in {data_dir / MANIFEST_FILE}"
            )
    return data_dir, manifest, n


def _check_layout(batch_size: int, dp_rank: int, dp_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size}; expected a positive integer")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank {dp_rank} / dp_size {dp_size}: expected 0 <= dp_rank < dp_size")


class TokenBlockStream(Iterator[torch.Tensor]):
    """Infinite iterator of ``LongTensor[batch_size, seq_len]`` batches for one DP rank.

    Deterministic in ``(dataset, split, seed)``; ``state_dict``/``load_state_dict`` resume exactly,
    also with a different ``dp_size`` as long as ``batch_size * dp_size`` stays the same. Each rank
    decodes every shard it touches (its items are spread over all shards); decoding is a memcpy,
    and at most one shard is held in memory.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        *,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        verify_checksums: bool = True,
    ) -> None:
        _check_layout(batch_size, dp_rank, dp_size)
        if seed < 0:
            raise ConfigError(f"seed is {seed}; expected a non-negative integer")
        self.data_dir, self.manifest, self.num_samples = _open(data_dir, split)
        self.split = split
        self.seq_len = self.manifest.seq_len
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.global_batch_size = batch_size * dp_size
        self.seed = seed
        self._counts = [s.num_samples for s in self.manifest.splits[split]]
        self._cache = _ShardCache(self.data_dir, self.manifest, split, verify_checksums)
        self._layouts: dict[int, tuple[np.ndarray, list[int]]] = {}
        self._perm_key: tuple[int, int] | None = None
        self._perm: np.ndarray | None = None
        self._epoch = 0
        self._index = 0  # item offset of the next global batch within self._epoch

    # -- order ----------------------------------------------------------------------------

    def _layout(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        """Shard order of ``epoch`` and the first item offset of each shard in that order."""
        if epoch not in self._layouts:
            if len(self._layouts) >= 2:  # a batch spans at most two epochs at a time
                self._layouts.pop(min(self._layouts))
            order = permutation(len(self._counts), self.seed, epoch)
            starts = np.concatenate([[0], np.cumsum([self._counts[k] for k in order])[:-1]])
            self._layouts[epoch] = (order, starts.tolist())
        return self._layouts[epoch]

    def _item(self, position: int) -> np.ndarray:
        """The block at global item ``position`` of the infinite stream."""
        epoch, offset = divmod(position, self.num_samples)
        order, starts = self._layout(epoch)
        j = bisect.bisect_right(starts, offset) - 1
        shard = int(order[j])
        if self._perm_key != (epoch, shard):
            self._perm = permutation(self._counts[shard], self.seed, epoch, shard)
            self._perm_key = (epoch, shard)
        assert self._perm is not None
        return self._cache.get(shard)[self._perm[offset - starts[j]]]

    # -- iteration ------------------------------------------------------------------------

    def __iter__(self) -> TokenBlockStream:
        return self

    def __next__(self) -> torch.Tensor:
        start = self._epoch * self.num_samples + self._index
        first = start + self.dp_rank * self.batch_size
        rows = [self._item(p) for p in range(first, first + self.batch_size)]
        # Advance only after a successful read, so a DataError leaves the state untouched.
        self._epoch, self._index = divmod(start + self.global_batch_size, self.num_samples)
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position of the next global batch; identical on every DP rank."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "index": self._index,
            "split": self.split,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "fingerprint": self.manifest.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuse a state of another dataset, split or seed."""
        where = self.data_dir / MANIFEST_FILE
        for key in ("epoch", "index", "split", "seed", "num_samples", "fingerprint"):
            if key not in state:
                raise DataError(f"reader state for {where}: key '{key}' is missing")
        fp = self.manifest.fingerprint()
        if state["num_samples"] != self.num_samples or state["fingerprint"] != fp:
            raise DataError(
                f"reader state was saved for a different dataset ({state['num_samples']} samples, "
                f"fingerprint {str(state['fingerprint'])[:12]}...) than {where} "
                f"({self.num_samples} samples, fingerprint {fp[:12]}...)"
            )
        for key, mine in (("split", self.split), ("seed", self.seed)):
            if state[key] != mine:
                raise DataError(
                    f"reader state for {where} was saved with {key} {state[key]!r} "
                    f"but this stream uses {mine!r}"
                )
        epoch, index = state["epoch"], state["index"]
        if (
            not (isinstance(epoch, int) and isinstance(index, int))
            or epoch < 0
            or not (0 <= index < self.num_samples)
        ):
            raise DataError(
                f"reader state for {where}: epoch {epoch!r} / index {index!r} out of "
                f"range (num_samples {self.num_samples})"
            )
        self._epoch, self._index = epoch, index


def eval_batches(
    data_dir: str | Path,
    split: str = "val",
    *,
    batch_size: int,
    num_batches: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    verify_checksums: bool = True,
) -> list[torch.Tensor]:
    """The first ``num_batches`` global batches of ``split`` in file order, this rank's slice.

    No shuffling: the validation set is the same for every run and every ``dp_size`` with the same
    global batch. If the split holds fewer than ``num_batches * batch_size * dp_size`` samples the
    file order wraps around, so some samples are evaluated more than once.
    """
    _check_layout(batch_size, dp_rank, dp_size)
    if num_batches < 0:
        raise ConfigError(f"num_batches is {num_batches}; expected a non-negative integer")
    data_dir, manifest, n = _open(data_dir, split)
    counts = [s.num_samples for s in manifest.splits[split]]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    cache = _ShardCache(data_dir, manifest, split, verify_checksums)
    g = batch_size * dp_size
    batches = []
    for b in range(num_batches):
        rows = []
        for p in range(b * g + dp_rank * batch_size, b * g + (dp_rank + 1) * batch_size):
            offset = p % n
            shard = bisect.bisect_right(starts, offset) - 1
            rows.append(cache.get(shard)[offset - starts[shard]])
        batches.append(torch.from_numpy(np.stack(rows).astype(np.int64)))
    return batches
