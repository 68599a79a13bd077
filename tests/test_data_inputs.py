"""Build inputs at scale: parquet, parallel reading, shard size, AutoTokenizer directories, input
errors naming the file, and `dlm data inspect`."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.build import build_dataset
from data_pipeline.inputs import read_inputs
from data_pipeline.manifest import Manifest
from data_pipeline.tokenizer import load_tokenizer, train_bpe
from launcher.cli import main as dlm
from pretrain.errors import DataError

QUIET = {"log": lambda _m: None}
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) for _ in range(300)]


def _manifest_id(m: Manifest) -> dict:
    return {k: [(s.sha256, s.num_samples) for s in v] for k, v in m.splits.items()}


def test_parquet_jsonl_and_txt_build_identical_shards(tmp_path, docs):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n".join(docs))
    parquet = tmp_path / "d.parquet"
    table = pa.table({"id": list(range(len(docs))), "content": docs})
    pq.write_table(table, parquet, row_group_size=64)  # several row groups
    kw = {"seq_len": 16, "vocab_size": 300, **QUIET}
    a = build_dataset([jsonl], tmp_path / "a", **kw)
    b = build_dataset([parquet], tmp_path / "b", text_field="content", **kw)
    c = build_dataset([txt], tmp_path / "c", **kw)
    assert _manifest_id(a) == _manifest_id(b) == _manifest_id(c)
    assert b.sources.inputs[0].num_documents == len(docs)


def test_parallel_reading_keeps_input_order_and_shard_size_target(tmp_path, docs):
    files = []
    for k in range(5):
        f = tmp_path / f"part{k}.txt"
        f.write_text("\n\n".join(docs[k * 60 : (k + 1) * 60]))
        files.append(f)
    assert read_inputs(files, workers=3) == read_inputs(files, workers=1)
    kw = {"seq_len": 16, "vocab_size": 300, **QUIET}
    one = build_dataset(files, tmp_path / "one", workers=1, **kw)
    par = build_dataset(files, tmp_path / "par", workers=3, **kw)
    assert _manifest_id(one) == _manifest_id(par)
    # 16 uint16 tokens = 32 bytes -> one 512-byte header + one 512-byte block per sample.
    sized = build_dataset(files, tmp_path / "sized", shard_size_mb=0.01024, **kw)
    assert {s.num_samples for s in sized.splits["train"][:-1]} == {10}
    # Plus the end-of-archive marker, padded to tar's 10 KiB record: negligible at real sizes.
    assert all(s.num_bytes <= 10240 + 10240 for s in sized.splits["train"])


@pytest.mark.parametrize(
    "name, write, match",
    [
        ("bad.txt", lambda p: p.write_bytes(b"fine\n\n\xff\xfe bad"), r"bad.txt: invalid UTF-8 at"),
        (
            "bad.jsonl",
            lambda p: p.write_bytes(b'{"text": "ok"}\n{"text": "\xc3\x28"}\n'),
            r"bad.jsonl: invalid UTF-8 at byte offset 25",
        ),
        (
            "bad.parquet",
            lambda p: pq.write_table(pa.table({"text": [b"ok", b"\xff bad"]}), p),
            r"bad.parquet: row 2: invalid UTF-8 at byte offset 0 in column 'text'",
        ),
        (
            "col.parquet",
            lambda p: pq.write_table(pa.table({"body": ["x"]}), p),
            r"col.parquet: no column 'text' \(columns: body\); choose one with --text-field",
        ),
        (
            "num.parquet",
            lambda p: pq.write_table(pa.table({"text": [1, 2]}), p),
            r"num.parquet: column 'text' has type int64; expected strings",
        ),
        ("junk.parquet", lambda p: p.write_bytes(b"not parquet"), r"junk.parquet: not a readable"),
        ("x.csv", lambda p: p.write_text("a,b"), r"x.csv: unsupported input type '.csv'"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path, name, write, match):
    path = tmp_path / name
    write(path)
    good = tmp_path / "good.txt"
    good.write_text("some text here\n\nmore")
    for workers in (1, 2):  # also through the process pool
        with pytest.raises(DataError, match=match) as err:
            build_dataset([good, path], tmp_path / "o", seq_len=4, vocab_size=300, workers=workers)
        assert "\n" not in str(err.value)


def test_auto_tokenizer_directory_without_tokenizer_json(tmp_path, docs):
    tok = train_bpe(docs, vocab_size=300)
    d = tmp_path / "hf"
    d.mkdir()
    tok.model.save(str(d))  # vocab.json + merges.txt, the GPT-2 "slow" files
    vocab = json.loads((d / "vocab.json").read_text())
    del vocab["<mask>"]  # a foreign tokenizer has no mask token: the build must add one
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    loaded = load_tokenizer(d)
    assert loaded.encode(docs[0]).ids == tok.encode(docs[0]).ids
    m = build_dataset([], tmp_path / "ds", seq_len=16, tokenizer=d, documents=docs, **QUIET)
    assert m.tokenizer.mask_token == "<mask>" and m.tokenizer.eos_token == "<eos>"
    assert m.tokenizer.mask_id not in vocab.values()  # added, special, outside the text vocab
    with pytest.raises(DataError, match=r"empty: directory has no tokenizer.json and is not"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(tmp_path / "empty")


def test_dlm_data_inspect(tmp_path, docs, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(docs))
    out = tmp_path / "ds"
    m = build_dataset([src], out, seq_len=16, vocab_size=300, samples_per_shard=32, **QUIET)
    assert dlm(["data", "inspect", str(out), "--samples", "2", "--top", "5"]) == 0
    text = capsys.readouterr().out
    n = m.num_samples("train")
    assert f"split train: {len(m.splits['train'])} shards, {n} blocks, {n * 16} tokens" in text
    assert text.count("--- train sample") == 2 and "⏎EOS⏎" in text
    assert "'Ġthe'" in text or "'the'" in text  # the commonest word is in the histogram
    assert f"input {src}: {len(docs)} documents" in text
    (out / m.splits["train"][0].name).write_bytes(b"garbage")
    assert dlm(["data", "inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train-00000.tar: sha256 is" in err and len(err.strip().splitlines()) == 1
