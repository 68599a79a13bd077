"""Tests of ``dlm data build``: tokenizer, packing, shards, manifest, input errors, CLI glue.

Shards are decoded here with the standard library's ``tarfile`` (not with our reader) so that the
build is checked against an independent decoder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from data_pipeline.build import build_dataset
from data_pipeline.commands import add_build_arguments, run_build
from data_pipeline.manifest import Manifest, check_compatible
from data_pipeline.tokenizer import (
    load_tokenizer,
    prepare_special_tokens,
    tokenizer_sha256,
    train_bpe,
)
from pretrain.errors import ConfigError, DataError

SEQ_LEN = 32
WORDS = (  # noqa: SIM905 - a sentence is easier to read than a 28-item list
    "the cat dog bird sat ran flew on under over mat tree house king queen said and then "
    "quickly slowly green red big small café naïve 日本 über"
).split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Unique, multi-line, partly non-ASCII documents; two carry literal special-token text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            for _ in range(rng.randint(1, 3))
        ]
        docs.append(f"doc {i}: " + "\n".join(lines) + ".")
    docs[3] = "this text says <mask> literally and also <eos> here."
    docs[7] = "<mask><mask> at the start."
    return docs


def quiet(_msg: str) -> None:
    """A log sink that keeps test output clean."""


def build(tmp_path: Path, docs: list[str], name: str = "ds", **kw) -> tuple[Path, Manifest]:
    src = tmp_path / f"{name}.txt"
    src.write_text("\n\n".join(docs), encoding="utf-8")
    out = tmp_path / name
    kw.setdefault("vocab_size", 400)
    kw.setdefault("samples_per_shard", 16)
    m = build_dataset([src], out, seq_len=SEQ_LEN, log=quiet, **kw)
    return out, m


def read_tar_blocks(path: Path, dtype: str) -> tuple[list[str], np.ndarray]:
    """Decode one shard with the stdlib: sample keys and a [n, seq_len] array."""
    keys, rows = [], []
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            key, ext = member.name.split(".", 1)
            assert ext == "tok", member.name
            keys.append(key)
            rows.append(
                np.frombuffer(
                    tf.extractfile(member).read(), dtype=np.dtype(dtype).newbyteorder("<")
                )
            )
    return keys, np.stack(rows)


def stored(out: Path, m: Manifest, split: str) -> np.ndarray:
    return np.concatenate([read_tar_blocks(out / s.name, m.dtype)[1] for s in m.splits[split]])


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Reference encoding: special-token text is ordinary text, no post-processing."""
    tok.encode_special_tokens = True
    return tok.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs(240)


@pytest.fixture(scope="module")
def built(tmp_path_factory, docs) -> tuple[Path, Manifest]:
    return build(tmp_path_factory.mktemp("built"), docs, val_fraction=0.1)


# ---------------------------------------------------------------------------------------------
# Round trip, packing, special tokens


def test_shards_round_trip_packed_stream_exactly(tmp_path, docs):
    out, m = build(tmp_path, docs, val_fraction=0.0)
    tok = load_tokenizer(out)
    eos = m.tokenizer.eos_id
    expected = [t for d in docs for t in (*encode(tok, d), eos)]
    n = len(expected) // SEQ_LEN
    got = stored(out, m, "train")
    assert got.shape == (n, SEQ_LEN) == (m.num_samples("train"), SEQ_LEN)
    assert got.reshape(-1).tolist() == expected[: n * SEQ_LEN]
    assert m.sources.dropped_tokens["train"] == len(expected) - n * SEQ_LEN
    assert list(m.splits) == ["train"]
    # EOS closes each document: at position (cumulative length incl. EOS) - 1, nowhere else.
    ends = np.cumsum([len(encode(tok, d)) + 1 for d in docs]) - 1
    flat = got.reshape(-1)
    assert np.flatnonzero(flat == eos).tolist() == ends[ends < flat.size].tolist()
    # Decoding the stored ids gives the documents back (byte-level BPE is lossless).
    text = tok.decode(got.reshape(-1).tolist(), skip_special_tokens=False)
    assert text.startswith("".join(d + "<eos>" for d in docs[:3]))


def test_split_keeps_whole_documents_and_never_leaks(built, docs):
    out, m = built
    tok = load_tokenizer(out)
    index = {tuple(encode(tok, d)): i for i, d in enumerate(docs)}
    assert len(index) == len(docs)
    found: dict[str, list[int]] = {}
    for split in ("train", "val"):
        flat = stored(out, m, split).reshape(-1).tolist()
        segments, cur = [], []
        for t in flat:
            if t == m.tokenizer.eos_id:
                segments.append(tuple(cur))
                cur = []
            else:
                cur.append(t)
        # Each block stream starts at a document boundary and every complete segment is a
        # whole document; only the trailing (dropped) remainder may be cut.
        found[split] = [index[s] for s in segments]
    assert not set(found["train"]) & set(found["val"])
    assert found["train"] == sorted(found["train"]) and found["val"] == sorted(found["val"])
    assert len(found["train"]) + len(found["val"]) >= len(docs) - 2
    assert m.sources.documents["val"] >= len(found["val"]) >= 1
    assert m.num_samples("val") >= 1


def test_mask_token_reserved_and_never_in_data(built, docs):
    out, m = built
    tok = load_tokenizer(out / "tokenizer.json")
    assert tok.token_to_id("<mask>") == m.tokenizer.mask_id
    assert tok.get_added_tokens_decoder()[m.tokenizer.mask_id].special
    assert m.tokenizer.eos_token == "<eos>" and m.tokenizer.eos_id == tok.token_to_id("<eos>")
    for split in m.splits:
        assert not np.any(stored(out, m, split) == m.tokenizer.mask_id)
    # Literal "<mask>" text survives as ordinary text (doc 3 and 7 are in the corpus).
    ids = encode(tok, docs[3])
    assert m.tokenizer.mask_id not in ids and m.tokenizer.eos_id not in ids
    assert tok.decode(ids) == docs[3]


def test_given_tokenizer_gets_mask_added(tmp_path, docs):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        docs,
        trainer=trainers.BpeTrainer(
            vocab_size=350,
            special_tokens=["</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    assert tok.token_to_id("<mask>") is None
    tok.save(str(tmp_path / "given.json"))
    out, m = build(tmp_path, docs, tokenizer=tmp_path / "given.json", val_fraction=0.0)
    assert m.tokenizer.eos_token == "</s>" and m.tokenizer.eos_id == tok.token_to_id("</s>")
    assert m.tokenizer.mask_id == tok.get_vocab_size(with_added_tokens=True)  # appended
    assert m.tokenizer.vocab_size == m.tokenizer.mask_id + 1
    saved = load_tokenizer(out)
    assert saved.token_to_id("<mask>") == m.tokenizer.mask_id
    assert saved.get_added_tokens_decoder()[m.tokenizer.mask_id].special


def test_prepare_special_tokens_rejects_ordinary_mask_and_missing_eos():
    ordinary = Tokenizer(models.WordLevel({"a": 0, "<mask>": 1, "</s>": 2}, unk_token="a"))
    with pytest.raises(DataError, match=r"'<mask>' \(id 1\) is an ordinary vocabulary token"):
        prepare_special_tokens(ordinary)
    no_eos = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    with pytest.raises(DataError, match="no end-of-sequence token found"):
        prepare_special_tokens(no_eos)
    st = prepare_special_tokens(no_eos, eos_token="b")
    assert (st.eos_id, st.mask_token, st.mask_id) == (1, "<mask>", 2)


def test_train_bpe_deterministic_and_byte_level(docs):
    a, b = train_bpe(docs, vocab_size=400), train_bpe(list(docs), vocab_size=400)
    assert tokenizer_sha256(a) == tokenizer_sha256(b)
    assert tokenizer_sha256(a) != tokenizer_sha256(train_bpe(docs, vocab_size=380))
    assert (a.token_to_id("<eos>"), a.token_to_id("<mask>")) == (0, 1)
    unseen = "zébra ✓ 🚀"
    assert a.decode(a.encode(unseen).ids) == unseen  # no unknown token
    with pytest.raises(ConfigError, match="vocab_size is 100"):
        train_bpe(docs, vocab_size=100)


# ---------------------------------------------------------------------------------------------
# Manifest


def test_manifest_fields_match_files(built):
    out, m = built
    assert Manifest.load(out) == m
    assert m.format_version == 1 and m.seq_len == SEQ_LEN and m.dtype == "uint16"
    tok = load_tokenizer(out / m.tokenizer.file)
    assert m.tokenizer.file == "tokenizer.json"
    assert m.tokenizer.sha256 == tokenizer_sha256(tok)
    assert m.tokenizer.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    for split, shards in m.splits.items():
        for k, s in enumerate(shards):
            path = out / s.name
            assert s.name == f"{split}-{k:05d}.tar"
            assert s.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
            assert s.num_bytes == path.stat().st_size
            keys, rows = read_tar_blocks(path, m.dtype)
            assert keys == [f"{split}-{k:05d}-{i:06d}" for i in range(len(keys))]
            assert s.num_samples == len(rows) and s.num_tokens == rows.size
            assert s.num_samples == 16 or k == len(shards) - 1
    assert len(m.splits["train"]) > 2
    assert m.sources.inputs[0].num_documents == 240 and m.sources.seed == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json"] + [s.name for v in m.splits.values() for s in v]
    )


def test_build_is_reproducible_and_seed_changes_split(tmp_path, docs):
    _, a = build(tmp_path, docs, name="a", val_fraction=0.1)
    _, b = build(tmp_path, docs, name="b", val_fraction=0.1)
    _, c = build(tmp_path, docs, name="c", val_fraction=0.1, seed=5)
    assert a.splits == b.splits and a.fingerprint() == b.fingerprint()
    assert a.sources.documents != c.sources.documents or a.splits != c.splits


def test_manifest_missing_or_ill_typed_field(built, tmp_path):
    out, _ = built
    raw = json.loads((out / "manifest.json").read_text())
    cases = [
        (lambda r: r["tokenizer"].pop("mask_id"), "tokenizer.mask_id' is missing"),
        (lambda r: r.__setitem__("seq_len", "32"), "seq_len' is '32'; expected an integer"),
        (
            lambda r: r["splits"]["train"][1].__setitem__("num_samples", True),
            r"splits.train\[1\].num_samples' is True",
        ),
        (lambda r: r["splits"]["val"][0].pop("sha256"), r"splits.val\[0\].sha256' is missing"),
        (lambda r: r.__setitem__("dtype", "int8"), "dtype' is 'int8'"),
    ]
    for i, (edit, msg) in enumerate(cases):
        d = tmp_path / f"m{i}"
        d.mkdir()
        bad = json.loads(json.dumps(raw))
        edit(bad)
        (d / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=re.escape(str(d / "manifest.json")) + ".*" + msg):
            Manifest.load(d)
    (tmp_path / "m0" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"m0/manifest.json: not valid JSON"):
        Manifest.load(tmp_path / "m0")
    with pytest.raises(DataError, match=r"nothing/manifest.json: not found"):
        Manifest.load(tmp_path / "nothing")


def test_check_compatible_names_both_sides(built):
    out, m = built
    where = "data/demo/manifest.json"
    check_compatible(
        m,
        where=where,
        seq_len=SEQ_LEN,
        vocab_size=m.tokenizer.vocab_size + 62,
        tokenizer_sha256=m.tokenizer.sha256,
    )
    with pytest.raises(DataError) as e:
        check_compatible(m, where=where, seq_len=256)
    assert str(e.value) == (
        f"data/demo/manifest.json: seq_len is {SEQ_LEN} but the config's data.seq_len is 256"
    )
    with pytest.raises(DataError, match=rf"vocab_size is {m.tokenizer.vocab_size} .* is 10;"):
        check_compatible(m, where=where, seq_len=SEQ_LEN, vocab_size=10)
    with pytest.raises(DataError, match="tokenizer.sha256 is .* but the run's tokenizer"):
        check_compatible(m, where=where, seq_len=SEQ_LEN, tokenizer_sha256="0" * 64)


# ---------------------------------------------------------------------------------------------
# Bad input


def _fails(tmp_path: Path, name: str, content: bytes, match: str, **kw) -> None:
    src = tmp_path / name
    src.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        build_dataset([src], tmp_path / "out", seq_len=SEQ_LEN, log=quiet, **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]


BAD_INPUTS = [  # (file, content, expected message, build kwargs)
    ("empty.txt", b"", r"empty.txt: is empty; expected UTF-8 text", {}),
    ("latin.txt", "wörld".encode("latin-1"), r"latin.txt: invalid UTF-8 at byte offset 1", {}),
    ("blank.txt", b" \n\n  \n", r"blank.txt: contains only whitespace", {}),
    ("x.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n{\'text\': 1}\n', r"x.jsonl:4: invalid JSON", {}),
    ("y.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"y.jsonl:2: no field 'text' \(fields: b", {}),
    ("z.jsonl", b'{"text": 5}\n', r"z.jsonl:1: field 'text' is int; expected a string", {}),
    ("data.csv", b"a,b\n", r"data.csv: unsupported input type '.csv'", {}),
    (
        "tiny.txt",
        b"a few words",
        r"tiny.txt: too small: found \d+ tokens .* needs 32",
        {"val_fraction": 0},
    ),
    (
        "small.txt",
        b"a b c d e f g h i j k l m n o p q r s t u v w x y z",
        r"small.txt: too small: "
        r".* one train and one val block of seq_len 32 needs 64",
        {},
    ),
]


@pytest.mark.parametrize("name,content,match,kw", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_file(tmp_path, name, content, match, kw):
    _fails(tmp_path, name, content, match, **kw)


def test_jsonl_text_field(tmp_path, docs):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    m = build_dataset(
        [src], tmp_path / "out", seq_len=SEQ_LEN, text_field="body", log=quiet, vocab_size=300
    )
    assert m.sources.inputs[0].num_documents == len(docs)
    assert m.num_samples("train") > 10


def test_missing_input_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt: input file not found"):
        build_dataset([tmp_path / "nope.txt"], tmp_path / "o", seq_len=8, log=quiet)


def test_failed_build_leaves_nothing_and_overwrite_is_explicit(tmp_path, docs, monkeypatch):
    out, m = build(tmp_path, docs[:80], val_fraction=0.0)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        build(tmp_path, docs, val_fraction=0.0)
    # Fail after the shards and tokenizer are written: the old dataset must survive untouched.
    with monkeypatch.context() as mp:
        mp.setattr("data_pipeline.build.tokenizer_sha256", lambda _t: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            build(tmp_path, docs, val_fraction=0.0, overwrite=True)
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    _, m2 = build(tmp_path, docs, val_fraction=0.0, overwrite=True)
    assert m2.num_samples("train") > m.num_samples("train") and Manifest.load(out) == m2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="not a dataset"):
        build_dataset([tmp_path / "ds.txt"], tmp_path / "src", seq_len=8, overwrite=True, log=quiet)
    assert (tmp_path / "src" / "code.py").exists()


# ---------------------------------------------------------------------------------------------
# CLI glue


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm data build")
    add_build_arguments(parser)
    return parser


def test_cli_build_from_file_and_help_strings(tmp_path, docs):
    parser = _parser()
    for action in parser._actions:
        assert action.help, action.dest
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(docs))
    opts = "--seq-len 16 --vocab-size 300 --samples-per-shard 8 --val-fraction 0.2 --seed 3"
    args = parser.parse_args([str(src), "--out", str(tmp_path / "o"), *opts.split()])
    assert run_build(args) == 0
    m = Manifest.load(tmp_path / "o")
    assert (m.seq_len, m.sources.seed, m.sources.val_fraction) == (16, 3, 0.2)
    assert all(s.num_samples <= 8 for s in m.splits["train"])
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["x.txt", "--out", "o", "--seq-len", "8", "--tokenizer", "t", "--vocab-size", "9"]
        )
    with pytest.raises(ConfigError, match="give INPUT files"):
        run_build(parser.parse_args(["--out", str(tmp_path / "p"), "--seq-len", "8"]))


def test_cli_demo_corpus(tmp_path):
    opts = "--demo --demo-documents 300 --seq-len 64 --vocab-size 500"
    args = _parser().parse_args([*opts.split(), "--out", str(tmp_path / "demo")])
    assert run_build(args) == 0
    m = Manifest.load(tmp_path / "demo")
    assert m.sources.embedded_documents == 300 and m.sources.inputs == []
    assert m.num_samples("train") > 0 and m.num_samples("val") > 0
