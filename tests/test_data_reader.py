"""Tests of the shard reader: order, determinism, data parallelism, resume, and shard errors."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

import data_pipeline.reader as reader_mod
from data_pipeline.build import build_dataset
from data_pipeline.manifest import Manifest
from data_pipeline.reader import TokenBlockStream, eval_batches, permutation
from pretrain.errors import DataError

SEQ_LEN = 16
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "tree",
    "king",
    "queen",
    "said",
    "and",
    "then",
    "big",
    "small",
]


def stored_rows(out: Path, m: Manifest, split: str) -> list[tuple[int, ...]]:
    """All blocks of a split in file order, decoded with the stdlib tarfile module."""
    rows = []
    for s in m.splits[split]:
        with tarfile.open(out / s.name) as tf:
            for member in tf.getmembers():
                data = tf.extractfile(member).read()
                rows.append(tuple(np.frombuffer(data, dtype="<u2").tolist()))
    return rows


def rows_of(batches: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(r) for b in batches for r in b.tolist()]


def take(stream: TokenBlockStream, n: int) -> list[torch.Tensor]:
    return [next(stream) for _ in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Manifest]:
    """~150 train blocks in shards of 16 (last one partial), ~20 val blocks."""
    root = tmp_path_factory.mktemp("reader")
    rng = random.Random(1)
    docs = [
        f"doc {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        for i in range(260)
    ]
    src = root / "in.txt"
    src.write_text("\n\n".join(docs))
    m = build_dataset(
        [src],
        root / "ds",
        seq_len=SEQ_LEN,
        vocab_size=300,
        samples_per_shard=16,
        val_fraction=0.1,
        log=lambda _m: None,
    )
    n = m.num_samples("train")
    assert n % 16 != 0 and len(m.splits["train"]) >= 8 and m.num_samples("val") >= 8
    return root / "ds", m


@pytest.fixture()
def copy(dataset, tmp_path) -> tuple[Path, Manifest]:
    """A private copy of the dataset that a test may damage."""
    dst = tmp_path / "ds"
    shutil.copytree(dataset[0], dst)
    return dst, dataset[1]


# ---------------------------------------------------------------------------------------------
# Content and order


def test_one_epoch_is_a_permutation_of_the_stored_blocks(dataset):
    out, m = dataset
    n = m.num_samples("train")
    s = TokenBlockStream(out, batch_size=1)
    assert s.manifest == m and s.seq_len == SEQ_LEN and s.num_samples == n
    epoch = take(s, n)
    assert all(b.dtype == torch.int64 and b.shape == (1, SEQ_LEN) for b in epoch)
    assert Counter(rows_of(epoch)) == Counter(stored_rows(out, m, "train"))
    assert rows_of(epoch) != stored_rows(out, m, "train")  # shuffled, not file order
    assert s.state_dict()["position"] == n and s.state_dict()["consumed"] == [n]
    second = take(s, n)
    assert Counter(rows_of(second)) == Counter(rows_of(epoch))
    assert rows_of(second) != rows_of(epoch)  # each epoch has its own order


def test_epoch_reads_shards_one_at_a_time_in_shuffled_order(dataset):
    out, m = dataset
    counts = [s.num_samples for s in m.splits["train"]]
    shard_of = np.repeat(np.arange(len(counts)), counts)
    index_in = np.concatenate([np.arange(c) for c in counts])
    where = {
        row: (int(shard_of[j]), int(index_in[j]))
        for j, row in enumerate(stored_rows(out, m, "train"))
    }
    assert len(where) == sum(counts)  # blocks are unique, so each has a known position
    seq = [where[r] for r in rows_of(take(TokenBlockStream(out, batch_size=1), sum(counts)))]
    # Each shard is visited as one contiguous run (so one cached shard suffices) ...
    order = [k for j, (k, _) in enumerate(seq) if j == 0 or seq[j - 1][0] != k]
    assert sorted(order) == list(range(len(counts)))
    assert order != sorted(order)
    # ... and its samples come in a shuffled order.
    runs = {k: [i for kk, i in seq if kk == k] for k in order}
    assert all(sorted(idx) == list(range(counts[k])) for k, idx in runs.items())
    assert sum(idx != sorted(idx) for idx in runs.values()) >= len(runs) - 1


def test_same_seed_same_stream_different_seed_different_order(dataset):
    out, m = dataset
    n = m.num_samples("train")
    steps = -(-n // 5) + 3  # a bit more than one epoch
    a = rows_of(take(TokenBlockStream(out, batch_size=5, seed=3), steps))
    b = rows_of(take(TokenBlockStream(out, batch_size=5, seed=3), steps))
    c = rows_of(take(TokenBlockStream(out, batch_size=5, seed=4), steps))
    assert a == b
    assert a[:20] != c[:20]
    assert Counter(a[:n]) == Counter(c[:n])


def test_permutation_is_stable_and_seeded():
    p = permutation(10, 0, 1)
    assert sorted(p.tolist()) == list(range(10))
    # Pinned: a change of the hash would silently change every resumed run's order.
    assert p.tolist() == [8, 3, 9, 7, 0, 2, 6, 4, 1, 5]
    assert p.tolist() != permutation(10, 0, 2).tolist()
    assert permutation(0, 1).tolist() == []


# ---------------------------------------------------------------------------------------------
# Data parallelism


def test_dp_ranks_are_disjoint_and_cover_an_epoch(dataset):
    out, m = dataset
    n, b = m.num_samples("train"), 4
    ranks = [TokenBlockStream(out, batch_size=b, dp_rank=r, dp_size=2) for r in range(2)]
    steps = -(-n // (2 * b))
    per_rank = [take(s, steps) for s in ranks]
    # Global order: batch k = rank 0's slice then rank 1's slice.
    merged = [row for k in range(steps) for r in range(2) for row in per_rank[r][k].tolist()]
    first_epoch = [tuple(r) for r in merged[:n]]
    assert Counter(first_epoch) == Counter(stored_rows(out, m, "train"))  # union == all, no dup
    assert ranks[0].state_dict() == ranks[1].state_dict()


def test_global_batch_does_not_depend_on_dp_size(dataset):
    out, _ = dataset
    single = take(TokenBlockStream(out, batch_size=12, seed=7), 20)
    for dp in (2, 3, 4):
        ranks = [
            TokenBlockStream(out, batch_size=12 // dp, dp_rank=r, dp_size=dp, seed=7)
            for r in range(dp)
        ]
        for k in range(20):
            assert torch.equal(torch.cat([next(s) for s in ranks]), single[k])


# ---------------------------------------------------------------------------------------------
# Resume


# Offsets relative to the first epoch boundary: resume before, at and after the batch that
# straddles it, and deep in a later epoch.
@pytest.mark.parametrize("where", ["start", "boundary-1", "boundary", "boundary+1", "later"])
def test_resume_equals_uninterrupted(dataset, where):
    out, m = dataset
    n = m.num_samples("train")
    assert n % 11 != 0  # so one batch straddles the epoch boundary
    boundary = n // 11
    consumed = {
        "start": 3,
        "boundary-1": boundary - 1,
        "boundary": boundary,
        "boundary+1": boundary + 1,
        "later": 2 * boundary + 5,
    }[where]
    reference = take(TokenBlockStream(out, batch_size=11, seed=2), consumed + 6)
    first = TokenBlockStream(out, batch_size=11, seed=2)
    take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = TokenBlockStream(out, batch_size=11, seed=2)
    resumed.load_state_dict(state)
    for k in range(6):
        assert torch.equal(next(resumed), reference[consumed + k])


def test_resume_with_different_dp_size(dataset):
    out, _ = dataset
    ranks = [TokenBlockStream(out, batch_size=3, dp_rank=r, dp_size=2) for r in range(2)]
    for s in ranks:
        take(s, 17)
    single = TokenBlockStream(out, batch_size=6)
    single.load_state_dict(ranks[0].state_dict())
    for _ in range(5):
        assert torch.equal(next(single), torch.cat([next(s) for s in ranks]))


def test_seek_reads_only_the_needed_shard(dataset, monkeypatch):
    out, m = dataset
    calls: list[int] = []
    real = reader_mod.read_shard
    monkeypatch.setattr(
        reader_mod, "read_shard", lambda *a, **k: calls.append(a[3]) or real(*a, **k)
    )
    s = TokenBlockStream(out, batch_size=1, seed=9)
    p = 5 * m.num_samples("train") + m.num_samples("train") // 2
    s.load_state_dict({**s.state_dict(), "position": p, "consumed": [p]})
    next(s)
    assert len(calls) == 1


def test_state_of_another_dataset_is_rejected(dataset):
    out, _ = dataset
    s = TokenBlockStream(out, batch_size=2)
    state = s.state_dict()
    with pytest.raises(DataError, match=r"different dataset .*ds/manifest.json"):
        s.load_state_dict({**state, "sources": [{**state["sources"][0], "fingerprint": "f" * 64}]})
    val = TokenBlockStream(out, "val", batch_size=2)
    with pytest.raises(DataError, match="different dataset"):
        val.load_state_dict(state)
    with pytest.raises(DataError, match="saved with seed 0 but this stream uses 1"):
        TokenBlockStream(out, batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="out of range or inconsistent"):
        s.load_state_dict({**state, "consumed": [10**6]})
    with pytest.raises(DataError, match="'position' is missing"):
        s.load_state_dict({k: v for k, v in state.items() if k != "position"})


# ---------------------------------------------------------------------------------------------
# Evaluation batches


def test_eval_batches_are_file_order_and_wrap(dataset):
    out, m = dataset
    rows = stored_rows(out, m, "val")
    n = len(rows)
    batches = eval_batches(out, batch_size=4, num_batches=n // 4 + 2)
    assert rows_of(batches) == [rows[i % n] for i in range(4 * (n // 4 + 2))]
    halves = [
        eval_batches(out, batch_size=2, num_batches=3, dp_rank=r, dp_size=2) for r in range(2)
    ]
    for k in range(3):
        assert torch.equal(torch.cat([halves[0][k], halves[1][k]]), batches[k])


# ---------------------------------------------------------------------------------------------
# Damaged datasets: each error names the shard and the manifest


def _read_all(data_dir: Path, **kw) -> None:
    s = TokenBlockStream(data_dir, batch_size=Manifest.load(data_dir).num_samples("train"), **kw)
    next(s)


def _expect(data_dir: Path, shard: str, match: str, **kw) -> None:
    with pytest.raises(DataError, match=match) as e:
        _read_all(data_dir, **kw)
    msg = str(e.value)
    assert str(data_dir / shard) in msg and str(data_dir / "manifest.json") in msg
    assert "\n" not in msg


def _rewrite_shard(data_dir: Path, name: str, samples: list[dict]) -> None:
    """Replace a shard and fix its manifest checksum, so only the content check can fire."""
    path = data_dir / name
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    raw = json.loads((data_dir / "manifest.json").read_text())
    for shard in raw["splits"]["train"]:
        if shard["name"] == name:
            shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            shard["num_bytes"] = path.stat().st_size
    (data_dir / "manifest.json").write_text(json.dumps(raw))


def _block(values) -> bytes:
    return np.asarray(values, dtype="<u2").tobytes()


def test_missing_shard(copy):
    out, m = copy
    (out / m.splits["train"][2].name).unlink()
    _expect(out, m.splits["train"][2].name, "shard is missing")


def test_truncated_tar(copy):
    out, m = copy
    name = m.splits["train"][1].name
    path = out / name
    full = path.read_bytes()
    # Each sample is a 512-byte header plus its data padded to 512: cut inside the second
    # sample's data, then inside its header (tarfile reads the latter as an early end).
    path.write_bytes(full[: 1024 + 512 + 10])
    _expect(out, name, r"corrupt or truncated tar \(", verify_checksums=False)
    _expect(out, name, "sha256 is .* but the manifest says")
    path.write_bytes(full[: 1024 + 100])
    _expect(out, name, "has 1 samples but the manifest says 16", verify_checksums=False)


def test_checksum_mismatch(copy):
    out, m = copy
    name = m.splits["train"][3].name
    raw = bytearray((out / name).read_bytes())
    raw[512] ^= 0x01  # first payload byte: the tar stays valid, only the content changes
    (out / name).write_bytes(bytes(raw))
    _expect(out, name, "sha256 is .* the shard is corrupt or modified")
    _read_all(out, verify_checksums=False)  # opting out reads the (changed) block


def test_wrong_block_length_missing_member_count_and_id_range(copy):
    out, m = copy
    name = m.splits["train"][0].name
    n = m.splits["train"][0].num_samples
    key = "train-00000-{:06d}".format
    _rewrite_shard(
        out, name, [{"__key__": key(i), "tok": _block(range(SEQ_LEN - 1))} for i in range(n)]
    )
    _expect(out, name, rf"sample train-00000-000000 has {2 * SEQ_LEN - 2} bytes; expected")
    _rewrite_shard(out, name, [{"__key__": key(i), "txt": b"hello"} for i in range(n)])
    _expect(out, name, r"has no 'tok' member \(has: txt\)")
    _rewrite_shard(
        out, name, [{"__key__": key(i), "tok": _block([1] * SEQ_LEN)} for i in range(n - 1)]
    )
    _expect(out, name, rf"has {n - 1} samples but the manifest says {n}")
    _rewrite_shard(
        out, name, [{"__key__": key(i), "tok": _block([65535] * SEQ_LEN)} for i in range(n)]
    )
    _expect(out, name, rf"token id 65535 >= tokenizer.vocab_size {m.tokenizer.vocab_size}")


def test_bad_manifest(copy):
    out, _ = copy
    raw = json.loads((out / "manifest.json").read_text())
    del raw["splits"]["train"][0]["num_tokens"]
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"ds/manifest.json: field 'splits.train\[0\].num_tokens'"):
        TokenBlockStream(out, batch_size=1)


def test_unknown_split(dataset):
    with pytest.raises(DataError, match=r"manifest.json: has no split 'test'; splits: train, val"):
        TokenBlockStream(dataset[0], "test", batch_size=1)
