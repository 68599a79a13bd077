"""Mixing, loader workers, resume across layouts, document ids, truncation and bad-shard skipping.

Sources are identified by content (the two datasets share no block), never through the reader's
own bookkeeping, so these tests check the stream itself.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_data_reader import rows_of
from test_data_reader import stored_rows as reader_stored_rows

from data_pipeline.build import build_dataset
from data_pipeline.loader import LoaderStream
from data_pipeline.manifest import Manifest
from data_pipeline.mixing import Source
from data_pipeline.reader import TokenBlockStream, document_ids
from data_pipeline.tokenizer import load_tokenizer
from pretrain.errors import DataError

SEQ_LEN = 16
QUIET = {"log": lambda _m: None}


def _docs(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 25))) for _ in range(n)]


def stored_rows(out: Path, split: str = "train") -> list[tuple[int, ...]]:
    return reader_stored_rows(out, Manifest.load(out), split)


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    """Two datasets with one tokenizer and disjoint blocks (different vocabularies of words)."""
    root = tmp_path_factory.mktemp("mix")
    a_txt, b_txt = root / "a.txt", root / "b.txt"
    a_txt.write_text("\n\n".join(_docs(["cat", "dog", "sat", "mat", "the", "on"], 220, 1)))
    b_txt.write_text("\n\n".join(_docs(["king", "queen", "ruled", "land", "a", "wise"], 120, 2)))
    build_dataset([a_txt, b_txt], root / "tok", seq_len=SEQ_LEN, vocab_size=300, **QUIET)
    tok = root / "tok" / "tokenizer.json"
    common = {"seq_len": SEQ_LEN, "tokenizer": tok, "samples_per_shard": 8, "val_fraction": 0.0}
    build_dataset([a_txt], root / "a", **common, **QUIET)
    build_dataset([b_txt], root / "b", **common, **QUIET)
    assert not set(stored_rows(root / "a")) & set(stored_rows(root / "b"))
    return root / "a", root / "b"


def take(stream, n: int) -> list[torch.Tensor]:
    return [next(stream) for _ in range(n)]


def mixed(two, weights=(3.0, 1.0), **kw) -> TokenBlockStream:
    a, b = two
    kw.setdefault("batch_size", 8)
    return TokenBlockStream(sources=[Source(str(a), weights[0]), Source(str(b), weights[1])], **kw)


# ---------------------------------------------------------------------------------------------
# Mixing


def test_mixing_proportions_and_each_source_keeps_its_own_order(two):
    a, b = two
    in_a = set(stored_rows(a))
    rows = rows_of(take(mixed(two, seed=5), 250))  # 2000 items: several epochs of each source
    from_a = [r for r in rows if r in in_a]
    from_b = [r for r in rows if r not in in_a]
    # The Weyl-sequence mixer is within O(log N / N) of the weights; we allow 0.01.
    assert abs(len(from_a) / len(rows) - 0.75) < 0.01
    for window in range(0, 2000, 400):  # also locally, not only on average
        part = rows[window : window + 400]
        assert abs(sum(r in in_a for r in part) / 400 - 0.75) < 0.02
    # Each source's items are exactly that source's own single-source stream (epochs complete).
    alone_a = rows_of(take(TokenBlockStream(a, batch_size=1, seed=5), len(from_a)))
    alone_b = rows_of(take(TokenBlockStream(b, batch_size=1, seed=5), len(from_b)))
    assert from_a == alone_a and from_b == alone_b


def test_mixture_is_deterministic_and_seeded(two):
    assert rows_of(take(mixed(two, seed=1), 20)) == rows_of(take(mixed(two, seed=1), 20))
    assert rows_of(take(mixed(two, seed=1), 20)) != rows_of(take(mixed(two, seed=2), 20))


def test_mixture_ranks_are_disjoint_slices_of_the_global_batch(two):
    single = take(mixed(two, batch_size=12, seed=3), 15)
    ranks = [mixed(two, batch_size=4, dp_rank=r, dp_size=3, seed=3) for r in range(3)]
    for k in range(15):
        assert torch.equal(torch.cat([next(s) for s in ranks]), single[k])
    assert ranks[0].state_dict() == ranks[2].state_dict()


@pytest.mark.parametrize("consumed", [1, 9, 40])
def test_mixture_resume_at_another_dp_size_and_batch(two, consumed):
    reference = rows_of(take(mixed(two, batch_size=6, seed=4), consumed + 10))
    ranks = [mixed(two, batch_size=3, dp_rank=r, dp_size=2, seed=4) for r in range(2)]
    for s in ranks:
        take(s, consumed)
    state = json.loads(json.dumps(ranks[1].state_dict()))
    resumed = mixed(two, batch_size=4, seed=4)  # one rank, another global batch size
    resumed.load_state_dict(state)
    assert rows_of(take(resumed, 15)) == reference[consumed * 6 : consumed * 6 + 60]


def test_changed_weights_continue_each_source_exactly(two):
    a, _ = two
    in_a = set(stored_rows(a))
    first = mixed(two, weights=(3.0, 1.0), seed=6)
    before = rows_of(take(first, 20))
    after_stream = mixed(two, weights=(1.0, 1.0), seed=6)
    after_stream.load_state_dict(first.state_dict())
    after = rows_of(take(after_stream, 30))
    assert abs(sum(r in in_a for r in after) / len(after) - 0.5) < 0.02
    a_rows = [r for r in before + after if r in in_a]
    alone = rows_of(take(TokenBlockStream(a, batch_size=1, seed=6), len(a_rows)))
    assert a_rows == alone  # no item of source a repeated or skipped across the change


def test_mixture_refuses_other_sources_and_mismatched_layout(two, tmp_path):
    a, b = two
    state = mixed(two).state_dict()
    with pytest.raises(DataError, match="different dataset.*same order"):
        mixed((b, a)).load_state_dict(state)
    with pytest.raises(DataError, match="weights are"):
        mixed(two, weights=(1.0, 0.0))
    other = tmp_path / "c"
    build_dataset(
        [],
        other,
        seq_len=8,
        tokenizer=a / "tokenizer.json",
        val_fraction=0.0,
        documents=["king queen ruled"] * 20,
        **QUIET,
    )
    with pytest.raises(DataError, match=r"c/manifest.json: seq_len is 8 .* must share"):
        TokenBlockStream(sources=[a, other], batch_size=1)


# ---------------------------------------------------------------------------------------------
# DataLoader workers


def test_workers_yield_the_single_process_stream_and_resume_with_other_counts(two):
    reference = take(mixed(two, seed=8), 14)
    srcs = [Source(str(two[0]), 3.0), Source(str(two[1]), 1.0)]
    two_workers = LoaderStream(num_workers=2, sources=srcs, batch_size=8, seed=8)
    first = take(two_workers, 6)
    assert all(torch.equal(x, y) for x, y in zip(first, reference[:6], strict=True))
    state = two_workers.state_dict()  # prefetched batches are not part of the state
    for workers in (3, 0):
        resumed = LoaderStream(num_workers=workers, sources=srcs, batch_size=8, seed=8)
        resumed.load_state_dict(state)
        rest = take(resumed, 8)
        assert all(torch.equal(x, y) for x, y in zip(rest, reference[6:], strict=True))


def test_workers_cover_an_epoch_once(two):
    a, _ = two
    n = Manifest.load(a).num_samples("train")
    loader = LoaderStream(num_workers=2, data_dir=a, batch_size=1)
    epoch = rows_of(take(loader, n))
    assert Counter(epoch) == Counter(stored_rows(a))  # every block once, none twice


# ---------------------------------------------------------------------------------------------
# Document ids


def test_document_ids_rules():
    eos = 0
    tokens = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9], [0, 5, 5, 5, 5, 0, 6, 0]])
    assert document_ids(tokens, eos).tolist() == [
        [0, 0, 0, 1, 1, 2, 3, 3],
        [0, 1, 1, 1, 1, 1, 2, 2],
    ]
    padded = document_ids(tokens, eos, lengths=torch.tensor([5, 8]))
    assert padded[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # padding is its own document
    assert padded[1].tolist() == [0, 1, 1, 1, 1, 1, 2, 2]


def test_document_ids_reconstruct_documents_across_block_boundaries(two):
    """Packed blocks, cut by document id and re-joined where a document spans two blocks,
    give back exactly the documents that went in, each ending in EOS."""
    a, _ = two
    m = Manifest.load(a)
    eos = m.tokenizer.eos_id
    blocks = torch.tensor(stored_rows(a), dtype=torch.int64)  # file order = packing order
    ids = document_ids(blocks, eos)
    docs: list[list[int]] = []
    for row, row_ids in zip(blocks.tolist(), ids.tolist(), strict=True):
        for j in range(max(row_ids) + 1):
            piece = [t for t, i in zip(row, row_ids, strict=True) if i == j]
            if docs and docs[-1][-1] != eos:  # the previous block ended mid-document
                docs[-1].extend(piece)
            else:
                docs.append(piece)
    tok = load_tokenizer(a / "tokenizer.json")
    tok.encode_special_tokens = True
    text = (a.parent / "a.txt").read_text().split("\n\n")
    expected = [tok.encode(d, add_special_tokens=False).ids + [eos] for d in text]
    assert docs[:-1] == expected[: len(docs) - 1]  # the last one may be cut (dropped tail)
    assert expected[len(docs) - 1][: len(docs[-1])] == docs[-1]
    assert sum(map(len, docs)) == blocks.numel()


# ---------------------------------------------------------------------------------------------
# Random-length truncation


def test_truncation_pads_with_eos_masks_loss_and_keeps_shapes(two):
    a, _ = two
    eos = Manifest.load(a).tokenizer.eos_id
    plain = TokenBlockStream(a, batch_size=20, seed=2)
    cut = TokenBlockStream(a, batch_size=20, seed=2, truncate_fraction=0.25)
    n_cut, n = 0, 0
    for _ in range(20):
        x, b = next(plain), cut.next_batch()
        assert b.tokens.shape == x.shape == b.loss_mask.shape == (20, SEQ_LEN)
        for row in range(20):
            length = int(b.lengths[row])
            assert 1 <= length <= SEQ_LEN
            assert torch.equal(b.tokens[row, :length], x[row, :length])
            assert bool((b.tokens[row, length:] == eos).all())
            assert b.loss_mask[row].tolist() == [True] * length + [False] * (SEQ_LEN - length)
            n_cut += length < SEQ_LEN
            n += 1
        assert int(b.document_ids.max()) >= 0
    # 400 rows at p = 0.25 (minus the 1/16 chance of drawing the full length): ~3.6 sigma window.
    assert 0.15 < n_cut / n < 0.30
    # Truncation is keyed by global position: any dp layout cuts the same sequences.
    halves = [
        TokenBlockStream(a, batch_size=10, dp_rank=r, dp_size=2, seed=2, truncate_fraction=0.25)
        for r in range(2)
    ]
    again = TokenBlockStream(a, batch_size=20, seed=2, truncate_fraction=0.25).next_batch()
    assert torch.equal(torch.cat([h.next_batch().lengths for h in halves]), again.lengths)


# ---------------------------------------------------------------------------------------------
# Bad shards: skip with a warning and a counter, or an error naming the shard


@pytest.fixture()
def damaged(two, tmp_path) -> tuple[Path, list[str]]:
    dst = tmp_path / "a"
    shutil.copytree(two[0], dst)
    m = Manifest.load(dst)
    bad = [m.splits["train"][1].name, m.splits["train"][4].name]
    raw = bytearray((dst / bad[0]).read_bytes())
    raw[512] ^= 0x01
    (dst / bad[0]).write_bytes(bytes(raw))  # checksum mismatch
    (dst / bad[1]).unlink()  # missing
    return dst, bad


def test_bad_shards_are_skipped_with_warning_and_counter(two, damaged, caplog):
    out, bad = damaged
    m = Manifest.load(out)
    n = m.num_samples("train")
    with caplog.at_level(logging.WARNING, logger="dlm.data"):
        s = TokenBlockStream(out, batch_size=1, on_bad_shard="skip")
        rows = rows_of(take(s, n))
    assert s.skipped_shards == 2
    assert all(any(name in r.getMessage() for r in caplog.records) for name in bad)
    # No block of a bad shard is delivered (read the intact original to know them); their
    # positions are filled from the next good shard of the epoch, so the length is unchanged.
    original = stored_rows(two[0])
    starts = np.cumsum([0] + [x.num_samples for x in m.splits["train"]])
    names = [x.name for x in m.splits["train"]]
    bad_rows = {
        r
        for name in bad
        for r in original[starts[names.index(name)] : starts[names.index(name) + 1]]
    }
    assert len(rows) == n and not bad_rows & set(rows)
    assert set(rows) == set(original) - bad_rows  # every good block still comes
    # Resuming makes the same substitutions.
    first = TokenBlockStream(out, batch_size=1, on_bad_shard="skip")
    take(first, 17)
    resumed = TokenBlockStream(out, batch_size=1, on_bad_shard="skip")
    resumed.load_state_dict(first.state_dict())
    assert rows_of(take(resumed, 30)) == rows[17:47]


def test_bad_shards_are_errors_by_default(damaged):
    out, bad = damaged
    with pytest.raises(DataError, match=rf"{bad[1]}: shard is missing; listed in"):
        TokenBlockStream(out, batch_size=1)
    (out / bad[1]).write_bytes(b"")  # present again, but empty: a truncated tar of 0 bytes
    s = TokenBlockStream(out, batch_size=Manifest.load(out).num_samples("train"))
    # Whichever damaged shard the shuffled order reaches first is named.
    with pytest.raises(DataError, match=rf"({bad[0]}|{bad[1]}): sha256 is .* corrupt or modified"):
        next(s)


def test_wrong_dtype_shard_names_shard_and_dtype(two, tmp_path):
    dst = tmp_path / "a"
    shutil.copytree(two[0], dst)
    m = Manifest.load(dst)
    name = m.splits["train"][0].name
    with wds.TarWriter(str(dst / name), encoder=False) as sink:
        for i in range(m.splits["train"][0].num_samples):
            sink.write({"__key__": f"k{i}", "tok": np.ones(SEQ_LEN, dtype="<u4").tobytes()})
    s = TokenBlockStream(dst, batch_size=4, verify_checksums=False)
    with pytest.raises(DataError, match=rf"{name}: sample k0 has 64 bytes; expected .* \(uint16\)"):
        for _ in range(m.num_samples("train")):
            next(s)


# ---------------------------------------------------------------------------------------------
# Shard URLs


def test_pipe_shard_urls_read_the_same_stream(two):
    a, _ = two
    local = rows_of(take(TokenBlockStream(a, batch_size=8), 10))
    piped = TokenBlockStream(sources=[Source(str(a), 1.0, f"pipe:cat {a}/{{name}}")], batch_size=8)
    assert rows_of(take(piped, 10)) == local
    broken = TokenBlockStream(
        sources=[Source(str(a), 1.0, "pipe:cat /nonexistent/{name}")], batch_size=8
    )
    with pytest.raises(DataError, match=r"pipe:cat /nonexistent/train-\d+.tar: could not read"):
        next(broken)
