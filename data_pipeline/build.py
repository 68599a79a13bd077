"""``dlm data build``: txt/jsonl/parquet -> tokenizer -> packed token blocks -> webdataset shards.

Layout of a built dataset directory::

    manifest.json          counts, checksums, tokenizer record (see manifest.py)
    tokenizer.json         the tokenizer that produced the ids, mask token included
    train-00000.tar ...    webdataset tars; sample ``train-00000-000000`` has one member ``.tok``
    val-00000.tar ...      holding seq_len little-endian ids in the manifest dtype

The builder holds the tokenized corpus in memory (uint32 ids: 4 bytes per token); input files are
read by parallel processes and tokenized on all cores. Every user-caused
problem raises :class:`DataError` (bad input) or :class:`ConfigError` (bad argument) with a
one-line message.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from tokenizers import Tokenizer

from data_pipeline.inputs import _progress, read_inputs
from data_pipeline.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    InputSource,
    Manifest,
    ShardInfo,
    Sources,
    TokenizerInfo,
    dtype_for_vocab,
)
from data_pipeline.tokenizer import (
    TOKENIZER_FILE,
    SpecialTokens,
    load_tokenizer,
    prepare_special_tokens,
    tokenizer_sha256,
    train_bpe,
)
from pretrain.errors import ConfigError, DataError

_EMBEDDED = "<documents>"
_ENCODE_CHUNK = 4096


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _split_key(seed: int, index: int) -> float:
    """Seeded hash of a document index mapped to [0, 1): decides train vs val, order-free."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def assign_splits(
    lengths: Sequence[int], *, seq_len: int, val_fraction: float, seed: int, source: str = "input"
) -> dict[str, list[int]]:
    """Assign whole documents to train/val by a seeded hash of their index (no leakage).

    ``lengths`` are token counts per document including its EOS. A document goes to val when its
    hash is below ``val_fraction``; if val then holds less than one block, the train documents
    with the smallest hashes move over until it holds one, so tiny corpora still get a val block.
    Returns document indices per split in ascending (corpus) order. ``source`` names the input
    in errors.
    """
    total = int(sum(lengths))
    need = seq_len * (2 if val_fraction > 0 else 1)
    if total < need:
        what = "one train and one val block" if val_fraction > 0 else "one block"
        hint = " (or use --val-fraction 0)" if val_fraction > 0 else ""
        raise DataError(
            f"{source}: too small: found {total} tokens (EOS included) but {what} of "
            f"seq_len {seq_len} needs {need}{hint}"
        )
    if val_fraction <= 0:
        return {"train": list(range(len(lengths)))}
    keys = [_split_key(seed, i) for i in range(len(lengths))]
    is_val = [k < val_fraction for k in keys]
    val_tokens = sum(n for n, v in zip(lengths, is_val, strict=True) if v)
    for i in sorted((i for i, v in enumerate(is_val) if not v), key=lambda i: keys[i]):
        if val_tokens >= seq_len:
            break
        is_val[i] = True
        val_tokens += lengths[i]
    if total - val_tokens < seq_len:
        raise DataError(
            f"{source}: too small: after putting {val_tokens} tokens in val, train has "
            f"{total - val_tokens} but one block of seq_len {seq_len} needs {seq_len}; "
            f"add text, lower --seq-len or use --val-fraction 0"
        )
    return {
        "train": [i for i, v in enumerate(is_val) if not v],
        "val": [i for i, v in enumerate(is_val) if v],
    }


def pack(docs: Sequence[np.ndarray], eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate ``doc + [eos]`` for each document; cut into ``[n, seq_len]`` blocks.

    Returns the blocks (uint32) and the number of trailing tokens dropped.
    """
    eos = np.array([eos_id], dtype=np.uint32)
    parts = [p for d in docs for p in (d, eos)]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len), len(stream) - n * seq_len


def write_shards(
    blocks: np.ndarray,
    out_dir: Path,
    split: str,
    *,
    dtype: str,
    samples_per_shard: int,
    log: Callable[[str], object],
) -> list[ShardInfo]:
    """Write ``blocks`` as ``{split}-{k:05d}.tar`` shards; return their manifest records."""
    le = np.dtype(dtype).newbyteorder("<")  # the on-disk format is little-endian everywhere
    shards: list[ShardInfo] = []
    for k, start in enumerate(range(0, len(blocks), samples_per_shard)):
        chunk = blocks[start : start + samples_per_shard].astype(le)
        name = f"{split}-{k:05d}.tar"
        path = out_dir / name
        # Fixed mtime/owner make the tar bytes (and so the checksums) reproducible across builds.
        with wds.TarWriter(str(path), encoder=False, mtime=0, user="dlm", group="dlm") as sink:
            for i, row in enumerate(chunk):
                sink.write({"__key__": f"{split}-{k:05d}-{i:06d}", "tok": row.tobytes()})
        info = ShardInfo(
            name=name,
            num_samples=len(chunk),
            num_tokens=int(chunk.size),
            sha256=file_sha256(path),
            num_bytes=path.stat().st_size,
        )
        shards.append(info)
        log(f"  wrote {name}: {info.num_samples} samples, {info.num_bytes / 1e6:.2f} MB")
    return shards


def build_dataset(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    seq_len: int,
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    samples_per_shard: int = 1024,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    documents: Sequence[str] | None = None,
    overwrite: bool = False,
    eos_token: str | None = None,
    log: Callable[[str], object] = print,
    workers: int = 1,
    progress: bool = False,
    shard_size_mb: float | None = None,
) -> Manifest:
    """Build a sharded, packed dataset in ``out_dir`` and return its manifest.

    ``inputs`` are .txt/.jsonl/.parquet files; ``documents`` are extra in-memory documents (the
    demo corpus), appended after the files. ``tokenizer`` is a tokenizer.json, a directory holding
    one or a Hugging Face ``AutoTokenizer`` directory; when None a byte-level BPE of
    ``vocab_size`` is trained on all documents. The build happens in a temporary sibling
    directory that is renamed into place at the end, so a failure never leaves a partial dataset;
    an existing ``out_dir`` is replaced only with ``overwrite=True``.

    ``workers`` processes read the input files in parallel (tokenisation is parallel inside the
    tokenizers library); ``progress`` shows progress bars; ``shard_size_mb`` sets the samples per
    shard from a target shard size instead of ``samples_per_shard``.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len is {seq_len}; expected a positive integer")
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard is {samples_per_shard}; expected a positive integer")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction is {val_fraction}; expected a number in [0, 1)")
    if seed < 0:
        raise ConfigError(f"seed is {seed}; expected a non-negative integer")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        if not overwrite:
            raise DataError(f"{out_dir}: already exists; pass --overwrite to replace it")
        if not (out_dir / MANIFEST_FILE).is_file():
            # Refuse to wipe something that is not a dataset even with overwrite (a typo in --out
            # pointing at a source tree would otherwise be deleted).
            raise DataError(
                f"{out_dir}: exists and is not a dataset (no {MANIFEST_FILE}); "
                f"refusing to overwrite it"
            )

    if shard_size_mb is not None and shard_size_mb <= 0:
        raise ConfigError(f"shard_size_mb is {shard_size_mb}; expected a positive number")

    # 1. Read documents, remembering where each came from for the manifest.
    texts: list[str] = []
    sources: list[InputSource] = []
    per_file = read_inputs(inputs, text_field=text_field, workers=workers, progress=progress)
    for path, docs in zip(inputs, per_file, strict=True):
        texts.extend(docs)
        sources.append(InputSource(name=str(path), num_documents=len(docs)))
        log(f"read {path}: {len(docs)} documents")
    embedded = [d for d in (documents or []) if d.strip()]
    texts.extend(embedded)
    if not texts:
        raise DataError("no input documents: give INPUT files (.txt or .jsonl) or --demo")

    # 2. Tokenizer: load or train, then reserve the mask token and locate EOS.
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        log(f"loaded tokenizer {tokenizer}")
    else:
        log(f"training byte-level BPE (vocab_size {vocab_size}) on {len(texts)} documents")
        tok = train_bpe(texts, vocab_size=vocab_size)
    special = prepare_special_tokens(tok, eos_token=eos_token)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = dtype_for_vocab(vocab)
    if shard_size_mb is not None:  # a tar member costs a 512-byte header plus padded data
        per_sample = 512 + -(-seq_len * np.dtype(dtype).itemsize // 512) * 512
        samples_per_shard = max(1, int(shard_size_mb * 1e6 // per_sample))

    # 3. Encode. encode_special_tokens=True makes literal "<mask>"/"<eos>" in the text ordinary
    # text, so the reserved ids only ever appear where we put them.
    ids = _encode(tok, texts, progress=progress)
    for i, d in enumerate(ids):
        if d.size and (int(d.max()) >= vocab or bool(np.any(d == special.mask_id))):
            raise DataError(
                f"{_source_of(i, sources)} encodes to a reserved or out-of-range id "
                f"(mask id {special.mask_id}, vocab_size {vocab}); check the tokenizer"
            )
    lengths = [len(d) + 1 for d in ids]
    log(
        f"tokenized {len(texts)} documents: {sum(lengths)} tokens with EOS (vocab {vocab}, {dtype})"
    )

    # 4. Split whole documents, pack, and write everything into a temp dir next to out_dir.
    names = [s.name for s in sources] + ([_EMBEDDED] if embedded else [])
    label = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    split_docs = assign_splits(
        lengths, seq_len=seq_len, val_fraction=val_fraction, seed=seed, source=label
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700; the renamed dataset must be readable by others
        splits: dict[str, list[ShardInfo]] = {}
        dropped: dict[str, int] = {}
        for split, members in split_docs.items():
            blocks, dropped[split] = pack([ids[i] for i in members], special.eos_id, seq_len)
            log(
                f"{split}: {len(members)} documents -> {len(blocks)} blocks of {seq_len} "
                f"({dropped[split]} trailing tokens dropped)"
            )
            splits[split] = write_shards(
                blocks, tmp, split, dtype=dtype, samples_per_shard=samples_per_shard, log=log
            )
        tok.save(str(tmp / TOKENIZER_FILE))
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            seq_len=seq_len,
            dtype=dtype,
            tokenizer=tokenizer_info(tok, special),
            splits=splits,
            sources=Sources(
                inputs=sources,
                embedded_documents=len(embedded),
                seed=seed,
                val_fraction=float(val_fraction),
                documents={k: len(v) for k, v in split_docs.items()},
                dropped_tokens=dropped,
            ),
        )
        manifest.save(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"dataset ready: {out_dir} ("
        + ", ".join(
            f"{k}: {manifest.num_samples(k)} blocks in {len(v)} shards" for k, v in splits.items()
        )
        + ")"
    )
    return manifest


def tokenizer_info(tok: Tokenizer, special: SpecialTokens) -> TokenizerInfo:
    """The manifest's record of ``tok`` as saved next to the shards (``tokenizer.json``)."""
    return TokenizerInfo(
        file=TOKENIZER_FILE,
        sha256=tokenizer_sha256(tok),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        mask_token=special.mask_token,
        mask_id=special.mask_id,
        eos_token=special.eos_token,
        eos_id=special.eos_id,
    )


def _encode(tok: Tokenizer, texts: list[str], *, progress: bool = False) -> list[np.ndarray]:
    """Token ids per document without post-processing or special-token extraction.

    ``encode_batch`` runs on all cores (the tokenizers library's thread pool); chunks bound the
    memory of the intermediate encodings and drive the progress bar.
    """
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    out: list[np.ndarray] = []
    bar = _progress(len(texts), "tokenize", "docs", progress)
    try:
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = texts[start : start + _ENCODE_CHUNK]
            encodings = tok.encode_batch(chunk, add_special_tokens=False)
            out.extend(np.asarray(e.ids, dtype=np.uint32) for e in encodings)
            bar.update(len(chunk))
    finally:
        tok.encode_special_tokens = previous
        bar.close()
    return out


def _source_of(index: int, sources: list[InputSource]) -> str:
    """``"<file>: document <n>"`` (1-based within its input) for global document ``index``."""
    for src in sources:
        if index < src.num_documents:
            return f"{src.name}: document {index + 1}"
        index -= src.num_documents
    return f"{_EMBEDDED}: document {index + 1}"


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``, replacing a previous dataset only at the end."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
