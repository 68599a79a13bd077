"""Deterministic, resumable, data-parallel reading of one or several built datasets.

The stream is defined on *global* positions so that it does not depend on the number of
data-parallel ranks or loader workers: position ``p`` of the infinite stream reads source
``s = mix(p)`` (weighted mixing, ``mixing.Mixture``) at that source's next item ``k``, which is
located by the source's epoch-shuffled order (``mixing.SourceOrder``). Global batch ``b`` is
positions ``[b*G, (b+1)*G)`` with ``G = batch_size * dp_size``, and rank ``r`` takes the ``r``-th
slice of ``batch_size`` items.

The state is the next global position plus how many items each source has delivered before it.
"Exact resume" means: the resumed stream yields, position for position, the items the
uninterrupted stream would have yielded. It holds for any new ``dp_size``, ``batch_size`` or number
of loader workers (the batches are just cut differently from the same item sequence); if the
mixture weights change, each source still continues exactly where it stopped (no item repeated or
skipped within a source), only the interleaving from then on follows the new weights.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.manifest import MANIFEST_FILE, Manifest
from data_pipeline.mixing import (
    Mixture,
    Source,
    SourceOrder,
    permutation,
    position_hash,
    resolve_sources,
)
from data_pipeline.shards import check_present, read_shard, shard_location
from data_pipeline.tokenizer import check_dataset_tokenizer
from pretrain.errors import ConfigError, DataError

__all__ = [
    "TokenBatch",
    "TokenBlockStream",
    "document_ids",
    "eval_batches",
    "permutation",
    "read_shard",
]

STATE_VERSION = 2
BAD_SHARD_POLICIES = ("error", "skip")


def document_ids(tokens: torch.Tensor, eos_id: int, lengths: torch.Tensor | None = None):
    """Per-position document index within each block: ``[b, L]`` int32.

    A document owns its tokens and the EOS that ends it, so ids increase right *after* each EOS:
    ``ids[i] = #EOS in tokens[:i]``. Position 0 is document 0 even when it continues a document
    begun in the previous block (attention never crosses blocks anyway). Positions at or beyond
    ``lengths[row]`` (random-length truncation padding) all get one extra id, so a document mask
    keeps padding away from real tokens. Two positions may attend to each other under document
    masking iff their ids are equal.
    """
    eos = (tokens == eos_id).to(torch.int32)
    ids = torch.cumsum(eos, dim=1) - eos  # [b, L]: EOS counted from the next position on
    if lengths is not None:
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        pad = pos >= lengths[:, None]
        last = ids.gather(1, (lengths[:, None] - 1).clamp(min=0))  # id of the last real token
        ids = torch.where(pad, last + 1, ids)
    return ids


@dataclass
class TokenBatch:
    """What the reader yields: clean tokens plus what the objective may need besides them."""

    tokens: torch.Tensor
    """x0 [b, L] int64; positions beyond ``lengths`` hold the EOS id (padding)."""
    loss_mask: torch.Tensor
    """[b, L] bool: True where the position is a training target; False on truncation padding."""
    lengths: torch.Tensor
    """[b] int64: real tokens per row (L unless the row was randomly truncated)."""
    eos_id: int
    skipped_shards: int = 0
    """Shards this reader has skipped so far (``on_bad_shard: skip``), for the metrics."""

    @property
    def document_ids(self) -> torch.Tensor:
        """[b, L] int32 document index per position (see :func:`document_ids`)."""
        return document_ids(self.tokens, self.eos_id, self.lengths)


class _ShardCache:
    """Holds the decoded blocks of at most one shard per source (the one being read)."""

    def __init__(self, data_dir: Path, manifest: Manifest, split: str, verify: bool, url) -> None:
        self._args = (data_dir, manifest, split)
        self._kw = {"verify_checksum": verify, "shard_url": url}
        self._index: int | None = None
        self._blocks: np.ndarray | None = None

    def get(self, shard: int) -> np.ndarray:
        if shard != self._index or self._blocks is None:
            self._blocks = None  # drop the old shard before decoding the next one
            self._blocks = read_shard(*self._args, shard, **self._kw)
            self._index = shard
        return self._blocks


def open_split(data_dir: str | Path, split: str) -> tuple[Path, Manifest, int]:
    """Load ``data_dir``'s manifest; check that ``split`` exists and is not empty."""
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
    return data_dir, manifest, n


class _SourceReader:
    """One source's manifest, order and shard cache."""

    def __init__(self, src: Source, split: str, seed: int, verify: bool, skip_bad: bool) -> None:
        self.data_dir, self.manifest, self.num_samples = open_split(src.path, split)
        self.shard_url = src.shard_url
        counts = [s.num_samples for s in self.manifest.splits[split]]
        where = str(self.data_dir / MANIFEST_FILE)
        if verify:  # the ids in the shards mean what this tokenizer says they mean
            check_dataset_tokenizer(self.data_dir, self.manifest.tokenizer, where)
        self.order = SourceOrder(counts, seed, where, skip_bad=skip_bad)
        self._cache = _ShardCache(self.data_dir, self.manifest, split, verify, src.shard_url)
        # Fail at start rather than hours in, when the stream first reaches a missing shard.
        for k in check_present(self.data_dir, self.manifest, split, src.shard_url):
            name = self.manifest.splits[split][k].name
            self.order.mark_bad(
                k, DataError(f"{self.data_dir / name}: shard is missing; listed in {where}")
            )

    def block(self, k: int) -> np.ndarray:
        """Item ``k`` of this source's infinite stream: ``[L]`` in the manifest dtype."""
        while True:
            shard, row = self.order.locate(k)
            try:
                return self._cache.get(shard)[row]
            except DataError as exc:
                self.order.mark_bad(shard, exc)  # raises unless bad shards are skipped


def _check_layout(batch_size: int, dp_rank: int, dp_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size}; expected a positive integer")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank {dp_rank} / dp_size {dp_size}: expected 0 <= dp_rank < dp_size")


class TokenBlockStream(Iterator[torch.Tensor]):
    """Infinite iterator of ``LongTensor[batch_size, seq_len]`` batches for one DP rank.

    ``next(stream)`` yields the tokens; ``stream.next_batch()`` the full :class:`TokenBatch`
    (loss mask, lengths, document ids). Deterministic in ``(sources, weights, split, seed)``;
    ``state_dict``/``load_state_dict`` resume exactly (see the module docstring). Give either
    ``data_dir`` (one source) or ``sources`` (a mixture; all must share seq_len and tokenizer).

    ``truncate_fraction``: LLaDA-style random lengths. That fraction of sequences (chosen by a
    hash of the global position) keeps only its first ``U{1..L}`` tokens; the rest becomes EOS
    padding with ``loss_mask`` False, so the batch stays ``[b, L]`` and tensor/sequence parallel
    shapes stay valid.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        split: str = "train",
        *,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        verify_checksums: bool = True,
        sources: Sequence[Source | str | Path] | None = None,
        on_bad_shard: str = "error",
        truncate_fraction: float = 0.0,
    ) -> None:
        _check_layout(batch_size, dp_rank, dp_size)
        if seed < 0:
            raise ConfigError(f"seed is {seed}; expected a non-negative integer")
        if on_bad_shard not in BAD_SHARD_POLICIES:
            raise ConfigError(f"on_bad_shard is {on_bad_shard!r}; expected one of error, skip")
        if not 0.0 <= truncate_fraction <= 1.0:
            raise ConfigError(f"truncate_fraction is {truncate_fraction}; expected [0, 1]")
        if (data_dir is None) == (not sources):
            raise ConfigError("give exactly one of data_dir and sources")
        srcs = resolve_sources(sources or [data_dir])  # type: ignore[list-item]
        self._sources = [
            _SourceReader(s, split, seed, verify_checksums, on_bad_shard == "skip") for s in srcs
        ]
        first = self._sources[0]
        for other in self._sources[1:]:
            _check_same_layout(first, other)
        self.mixture = Mixture([s.weight for s in srcs], seed)
        self.data_dir, self.manifest, self.num_samples = (
            first.data_dir,
            first.manifest,
            first.num_samples,
        )
        self.split = split
        self.seq_len = self.manifest.seq_len
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.global_batch_size = batch_size * dp_size
        self.seed = seed
        self.truncate_fraction = truncate_fraction
        self._position = 0  # global position of the next global batch
        self._consumed = [0] * len(self._sources)  # items each source delivered before it

    @property
    def skipped_shards(self) -> int:
        return sum(len(s.order.bad) for s in self._sources)

    # -- order ----------------------------------------------------------------------------

    def _plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions, sources and per-source item indices of the next global batch ([G] each)."""
        pos = np.arange(self._position, self._position + self.global_batch_size, dtype=np.int64)
        src = self.mixture.source_of(pos)
        item = np.empty_like(pos)
        for s in range(len(self._sources)):
            hit = src == s
            item[hit] = self._consumed[s] + np.arange(int(hit.sum()))
        return pos, src, item

    def _advance(self, src: np.ndarray) -> None:
        counts = np.bincount(src, minlength=len(self._sources))
        self._consumed = [c + int(n) for c, n in zip(self._consumed, counts, strict=True)]
        self._position += self.global_batch_size

    def skip_batches(self, n: int) -> None:
        """Move ``n`` global batches ahead without reading any shard."""
        for _ in range(n):
            self._advance(self._plan()[1])

    def _lengths(self, pos: np.ndarray) -> np.ndarray:
        """Kept tokens per position: L, or ``U{1..L}`` for the truncated fraction."""
        lengths = np.full(len(pos), self.seq_len, dtype=np.int64)
        if self.truncate_fraction > 0:
            pick = position_hash(self.seed, "truncate", pos) < np.uint64(
                min(int(self.truncate_fraction * 2.0**64), 2**64 - 1)
            )
            draw = position_hash(self.seed, "length", pos) % np.uint64(self.seq_len)
            lengths[pick] = draw[pick].astype(np.int64) + 1
        return lengths

    # -- iteration ------------------------------------------------------------------------

    def __iter__(self) -> TokenBlockStream:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch().tokens

    def next_batch(self) -> TokenBatch:
        """This rank's slice of the next global batch."""
        pos, src, item = self._plan()
        mine = slice(self.dp_rank * self.batch_size, (self.dp_rank + 1) * self.batch_size)
        rows = [self._sources[s].block(int(k)) for s, k in zip(src[mine], item[mine], strict=True)]
        tokens = np.stack(rows).astype(np.int64)  # [b, L]
        lengths = self._lengths(pos[mine])  # [b]
        keep = np.arange(self.seq_len)[None, :] < lengths[:, None]  # [b, L]
        eos = self.manifest.tokenizer.eos_id
        for row in np.flatnonzero(lengths < self.seq_len):  # only the few truncated rows
            tokens[row, lengths[row] :] = eos
        # Advance only after a successful read, so a DataError leaves the state untouched.
        self._advance(src)
        return TokenBatch(
            tokens=torch.from_numpy(tokens),
            loss_mask=torch.from_numpy(keep),
            lengths=torch.from_numpy(lengths),
            eos_id=eos,
            skipped_shards=self.skipped_shards,
        )

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position of the next global batch; identical on every DP rank and worker."""
        return {
            "version": STATE_VERSION,
            "position": self._position,
            "consumed": list(self._consumed),
            "split": self.split,
            "seed": self.seed,
            "sources": [
                {"num_samples": s.num_samples, "fingerprint": s.manifest.fingerprint()}
                for s in self._sources
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuse a state of other datasets, another split or seed.

        Also reads the single-dataset states of the first format (``epoch``/``index``).
        """
        where = self.data_dir / MANIFEST_FILE
        state = _upgrade_state(state, where)
        for key in ("position", "consumed", "split", "seed", "sources"):
            if key not in state:
                raise DataError(f"reader state for {where}: key '{key}' is missing")
        saved, mine = state["sources"], self.state_dict()["sources"]
        if len(saved) != len(mine) or any(
            a.get("num_samples") != b["num_samples"] or a.get("fingerprint") != b["fingerprint"]
            for a, b in zip(saved, mine, strict=False)
        ):
            desc = ", ".join(
                f"{a.get('num_samples')} samples, fingerprint {str(a.get('fingerprint'))[:12]}..."
                for a in saved
            )
            have = ", ".join(
                f"{s.data_dir / MANIFEST_FILE} ({b['num_samples']} samples, fingerprint "
                f"{b['fingerprint'][:12]}...)"
                for s, b in zip(self._sources, mine, strict=True)
            )
            raise DataError(
                f"reader state was saved for a different dataset ({desc}) than {have}; "
                f"sources must stay the same and in the same order"
            )
        for key, value in (("split", self.split), ("seed", self.seed)):
            if state[key] != value:
                raise DataError(
                    f"reader state for {where} was saved with {key} {state[key]!r} "
                    f"but this stream uses {value!r}"
                )
        position, consumed = state["position"], state["consumed"]
        ok = (
            isinstance(position, int)
            and position >= 0
            and isinstance(consumed, list)
            and len(consumed) == len(self._sources)
            and all(isinstance(c, int) and c >= 0 for c in consumed)
            and sum(consumed) == position
        )
        if not ok:
            raise DataError(
                f"reader state for {where}: position {position!r} / consumed {consumed!r} "
                f"out of range or inconsistent"
            )
        self._position, self._consumed = position, list(consumed)


def _upgrade_state(state: dict[str, Any], where: Path) -> dict[str, Any]:
    """Translate a version-1 (single dataset, ``epoch``/``index``) state into version 2."""
    if state.get("version", 1) != 1:
        return state
    for key in ("epoch", "index", "split", "seed", "num_samples", "fingerprint"):
        if key not in state:
            raise DataError(f"reader state for {where}: key '{key}' is missing")
    epoch, index, n = state["epoch"], state["index"], state["num_samples"]
    if not (isinstance(epoch, int) and isinstance(index, int)) or epoch < 0 or not 0 <= index < n:
        raise DataError(
            f"reader state for {where}: epoch {epoch!r} / index {index!r} out of "
            f"range (num_samples {n})"
        )
    position = epoch * n + index
    return {
        "position": position,
        "consumed": [position],
        "split": state["split"],
        "seed": state["seed"],
        "sources": [{"num_samples": n, "fingerprint": state["fingerprint"]}],
    }


def _check_same_layout(first: _SourceReader, other: _SourceReader) -> None:
    a, b = first.manifest, other.manifest
    for what, x, y in (
        ("seq_len", a.seq_len, b.seq_len),
        ("tokenizer.sha256", a.tokenizer.sha256, b.tokenizer.sha256),
    ):
        if x != y:
            raise DataError(
                f"{other.data_dir / MANIFEST_FILE}: {what} is {str(y)[:16]} but "
                f"{first.data_dir / MANIFEST_FILE} has {str(x)[:16]}; mixed sources must share "
                f"seq_len and tokenizer"
            )


def eval_batches(
    data_dir: str | Path,
    split: str = "val",
    *,
    batch_size: int,
    num_batches: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    verify_checksums: bool = True,
    shard_url: str | None = None,
) -> list[torch.Tensor]:
    """The first ``num_batches`` global batches of ``split`` in file order, this rank's slice.

    No shuffling: the validation set is the same for every run and every ``dp_size`` with the same
    global batch. If the split holds fewer than ``num_batches * batch_size * dp_size`` samples the
    file order wraps around, so some samples are evaluated more than once.
    """
    _check_layout(batch_size, dp_rank, dp_size)
    if num_batches < 0:
        raise ConfigError(f"num_batches is {num_batches}; expected a non-negative integer")
    data_dir, manifest, n = open_split(data_dir, split)
    for k in check_present(data_dir, manifest, split, shard_url):
        name = shard_location(data_dir, manifest.splits[split][k].name, shard_url)
        raise DataError(f"{name}: shard is missing; listed in {data_dir / MANIFEST_FILE}")
    counts = [s.num_samples for s in manifest.splits[split]]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    cache = _ShardCache(data_dir, manifest, split, verify_checksums, shard_url)
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
