"""``dlm data build``: text/jsonl -> tokenizer -> packed token blocks -> webdataset shards.

Layout of a built dataset directory::

    manifest.json          counts, checksums, tokenizer record (see manifest.py)
    tokenizer.json         the tokenizer that produced the ids, mask token included
    train-00000.tar ...    webdataset tars; sample ``train-00000-000000`` has one member ``.tok``
    val-00000.tar ...      holding seq_len little-endian ids in the manifest dtype

This is the simple single-process builder: it holds the corpus in memory. Every user-caused
problem raises :class:`DataError` (bad input) or :class:`ConfigError` (bad argument) with a
one-line message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from tokenizers import Tokenizer

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
    load_tokenizer,
    prepare_special_tokens,
    tokenizer_sha256,
    train_bpe,
)
from pretrain.errors import ConfigError, DataError

# One or more blank (whitespace-only) lines separate documents in a .txt input.
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_EMBEDDED = "<documents>"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_utf8(path: Path) -> str:
    """Read ``path`` as strict UTF-8 with normalised newlines; name the file in every error."""
    if not path.exists():
        raise DataError(f"{path}: input file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a .txt or .jsonl file")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{path}: is empty; expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: invalid UTF-8 at byte offset {exc.start} "
            f"(byte 0x{raw[exc.start]:02x}); expected UTF-8 text"
        ) from exc
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def read_txt(path: str | Path) -> list[str]:
    """Documents of a .txt file: blocks of text separated by one or more blank lines."""
    path = Path(path)
    docs = [d.strip("\n") for d in _BLANK_LINES.split(_read_utf8(path))]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path}: contains only whitespace; expected UTF-8 text")
    return docs


def read_jsonl(path: str | Path, *, text_field: str = "text") -> list[str]:
    """Documents of a .jsonl file: the string field ``text_field`` of one JSON object per line."""
    path = Path(path)
    docs: list[str] = []
    # split("\n"), not splitlines(): the latter also breaks on U+2028 inside JSON strings.
    for lineno, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                f"expected one JSON object per line"
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}:{lineno}: is a JSON {type(obj).__name__}; expected an object "
                f"with a '{text_field}' field"
            )
        if text_field not in obj:
            fields = ", ".join(sorted(obj)[:8]) or "none"
            raise DataError(
                f"{path}:{lineno}: no field '{text_field}' (fields: {fields}); "
                f"choose one with --text-field"
            )
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}; expected a string"
            )
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"{path}: contains no non-empty '{text_field}' documents")
    return docs


def read_input(path: str | Path, *, text_field: str = "text") -> list[str]:
    """Dispatch on the file extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_txt(path)
    if suffix == ".jsonl":
        return read_jsonl(path, text_field=text_field)
    raise DataError(
        f"{path}: unsupported input type '{suffix or '(none)'}'; expected .txt or .jsonl"
    )


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
) -> Manifest:
    """Build a sharded, packed dataset in ``out_dir`` and return its manifest.

    ``inputs`` are .txt/.jsonl files; ``documents`` are extra in-memory documents (the demo corpus),
    appended after the files. ``tokenizer`` is a tokenizer.json (or its directory) to use; when None
    a byte-level BPE of ``vocab_size`` is trained on all documents. The build happens in a temporary
    sibling directory that is renamed into place at the end, so a failure never leaves a partial
    dataset; an existing ``out_dir`` is replaced only with ``overwrite=True``.
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

    # 1. Read documents, remembering where each came from for the manifest.
    texts: list[str] = []
    sources: list[InputSource] = []
    for path in inputs:
        docs = read_input(path, text_field=text_field)
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

    # 3. Encode. encode_special_tokens=True makes literal "<mask>"/"<eos>" in the text ordinary
    # text, so the reserved ids only ever appear where we put them.
    ids = _encode(tok, texts)
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
            tokenizer=TokenizerInfo(
                file=TOKENIZER_FILE,
                sha256=tokenizer_sha256(tok),
                vocab_size=vocab,
                mask_token=special.mask_token,
                mask_id=special.mask_id,
                eos_token=special.eos_token,
                eos_id=special.eos_id,
            ),
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


def _encode(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids per document without post-processing or special-token extraction."""
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        encodings = tok.encode_batch(texts, add_special_tokens=False)
    finally:
        tok.encode_special_tokens = previous
    return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]


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
