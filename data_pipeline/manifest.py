"""The dataset manifest: ``<data_dir>/manifest.json`` describes every shard of a built dataset.

The manifest is the contract between ``dlm data build`` and the reader: the reader trusts its counts
to seek without decoding shards, its checksums to detect corruption, and its tokenizer record to
check the model config. Loading therefore validates every field and names the offending one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.errors import DataError

SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
"""A shard (or tokenizer) file name: plain, inside the dataset directory. Names are substituted
into `shard_url` templates that webdataset may run through a shell (`pipe:`), so nothing in
them may be a path separator, a space or a shell metacharacter."""

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
DTYPES = ("uint16", "uint32")
UINT16_VOCAB_LIMIT = 65536


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every token id below ``vocab_size``."""
    return "uint16" if vocab_size <= UINT16_VOCAB_LIMIT else "uint32"


@dataclass(frozen=True)
class ShardInfo:
    """One webdataset tar of ``num_samples`` blocks of ``seq_len`` tokens."""

    name: str
    num_samples: int
    num_tokens: int
    sha256: str
    num_bytes: int


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer stored next to the shards and its reserved tokens."""

    file: str
    sha256: str
    vocab_size: int
    mask_token: str
    mask_id: int
    eos_token: str
    eos_id: int


@dataclass(frozen=True)
class InputSource:
    """One input file of the build (path as given) and how many documents it contributed."""

    name: str
    num_documents: int


@dataclass(frozen=True)
class Sources:
    """Where the data came from and how it was split, so that a build can be reproduced."""

    inputs: list[InputSource]
    embedded_documents: int
    seed: int
    val_fraction: float
    documents: dict[str, int] = field(default_factory=dict)
    dropped_tokens: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """Typed view of ``manifest.json``."""

    format_version: int
    seq_len: int
    dtype: str
    tokenizer: TokenizerInfo
    splits: dict[str, list[ShardInfo]]
    sources: Sources

    @property
    def itemsize(self) -> int:
        """Bytes per stored token."""
        return 2 if self.dtype == "uint16" else 4

    def num_samples(self, split: str) -> int:
        """Total number of blocks in ``split``."""
        return sum(s.num_samples for s in self.splits[split])

    def fingerprint(self) -> str:
        """SHA-256 identifying the data itself (blocks, layout, tokenizer), not how it was built.

        Reader states carry it so that a state is never applied to a different dataset; paths of
        the inputs are deliberately left out, so a byte-identical rebuild keeps the fingerprint.
        """
        ident = {
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "tokenizer_sha256": self.tokenizer.sha256,
            "splits": {k: [asdict(s) for s in v] for k, v in sorted(self.splits.items())},
        }
        blob = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict in the on-disk layout."""
        return asdict(self)

    def save(self, data_dir: str | Path) -> Path:
        """Write ``data_dir/manifest.json`` atomically (temp file in that dir + ``os.replace``)."""
        data_dir = Path(data_dir)
        target = data_dir / MANIFEST_FILE
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{MANIFEST_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_json(), fh, indent=2, sort_keys=False)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a dataset is meant to be shared
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, data_dir: str | Path) -> Manifest:
        """Read and strictly validate ``data_dir/manifest.json``.

        Raises:
            DataError: the file is missing or not JSON, or a field is missing, ill-typed, unknown
                or inconsistent; the message names ``<dir>/manifest.json`` and the field.
        """
        path = Path(data_dir) / MANIFEST_FILE
        if not path.is_file():
            raise DataError(f"{path}: not found; expected a dataset built by 'dlm data build'")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        return _parse_manifest(raw, str(path))


# ---------------------------------------------------------------------------------------------
# Strict parsing. Every helper takes the dotted field name so errors can point at it exactly.


def _fail(where: str, name: str, msg: str) -> DataError:
    return DataError(f"{where}: field '{name}' {msg}")


def _obj(value: Any, where: str, name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Check ``value`` is an object with exactly ``keys`` (unknown keys are typos or a newer
    format, both of which we would rather report than silently ignore)."""
    if not isinstance(value, dict):
        raise _fail(where, name, f"is {type(value).__name__}; expected an object")
    for k in keys:
        if k not in value:
            full = f"{name}.{k}" if name else k
            raise DataError(f"{where}: field '{full}' is missing")
    extra = sorted(set(value) - set(keys))
    if extra:
        full = f"{name}.{extra[0]}" if name else extra[0]
        raise DataError(f"{where}: field '{full}' is unknown; expected only {', '.join(keys)}")
    return value


def _int(value: Any, where: str, name: str, *, minimum: int = 0) -> int:
    # bool is a subclass of int; `true` is never a valid count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, name, f"is {value!r}; expected an integer")
    if value < minimum:
        raise _fail(where, name, f"is {value}; expected an integer >= {minimum}")
    return value


def _str(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, name, f"is {value!r}; expected a non-empty string")
    return value


def _plain_name(value: Any, where: str, name: str) -> str:
    value = _str(value, where, name)
    if not SHARD_NAME.fullmatch(value) or ".." in value:
        raise _fail(
            where,
            name,
            f"is {value[:80]!r}; expected a plain file name inside the dataset directory "
            "(letters, digits, '.', '_', '-')",
        )
    return value


def _sha(value: Any, where: str, name: str) -> str:
    value = _str(value, where, name)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise _fail(where, name, f"is {value!r}; expected a 64-digit lowercase hex sha256")
    return value


def _count_map(value: Any, where: str, name: str) -> dict[str, int]:
    if not isinstance(value, dict):
        raise _fail(where, name, f"is {type(value).__name__}; expected an object")
    return {str(k): _int(v, where, f"{name}.{k}") for k, v in value.items()}


def _parse_manifest(raw: Any, where: str) -> Manifest:
    top = _obj(
        raw, where, "", ("format_version", "seq_len", "dtype", "tokenizer", "splits", "sources")
    )
    version = _int(top["format_version"], where, "format_version")
    if version != FORMAT_VERSION:
        raise _fail(where, "format_version", f"is {version}; this version reads {FORMAT_VERSION}")
    seq_len = _int(top["seq_len"], where, "seq_len", minimum=1)
    dtype = top["dtype"]
    if dtype not in DTYPES:
        raise _fail(where, "dtype", f"is {dtype!r}; expected one of {', '.join(DTYPES)}")

    t = _obj(
        top["tokenizer"],
        where,
        "tokenizer",
        ("file", "sha256", "vocab_size", "mask_token", "mask_id", "eos_token", "eos_id"),
    )
    tok = TokenizerInfo(
        file=_plain_name(t["file"], where, "tokenizer.file"),
        sha256=_sha(t["sha256"], where, "tokenizer.sha256"),
        vocab_size=_int(t["vocab_size"], where, "tokenizer.vocab_size", minimum=1),
        mask_token=_str(t["mask_token"], where, "tokenizer.mask_token"),
        mask_id=_int(t["mask_id"], where, "tokenizer.mask_id"),
        eos_token=_str(t["eos_token"], where, "tokenizer.eos_token"),
        eos_id=_int(t["eos_id"], where, "tokenizer.eos_id"),
    )
    for name, tid in (("mask_id", tok.mask_id), ("eos_id", tok.eos_id)):
        if tid >= tok.vocab_size:
            raise _fail(
                where,
                f"tokenizer.{name}",
                f"is {tid}; expected < tokenizer.vocab_size ({tok.vocab_size})",
            )
    if tok.mask_id == tok.eos_id:
        raise _fail(
            where,
            "tokenizer.mask_id",
            f"is {tok.mask_id}, the same as tokenizer.eos_id; expected the mask token's own id",
        )
    if dtype == "uint16" and tok.vocab_size > UINT16_VOCAB_LIMIT:
        raise _fail(
            where,
            "dtype",
            f"is uint16 but tokenizer.vocab_size is {tok.vocab_size}; expected uint32",
        )

    if not isinstance(top["splits"], dict) or not top["splits"]:
        raise _fail(where, "splits", "must be a non-empty object of split name -> shard list")
    splits: dict[str, list[ShardInfo]] = {}
    for split, shards in top["splits"].items():
        if not isinstance(shards, list):
            raise _fail(where, f"splits.{split}", f"is {type(shards).__name__}; expected a list")
        parsed = []
        for k, s in enumerate(shards):
            n = f"splits.{split}[{k}]"
            s = _obj(s, where, n, ("name", "num_samples", "num_tokens", "sha256", "num_bytes"))
            info = ShardInfo(
                name=_plain_name(s["name"], where, f"{n}.name"),
                num_samples=_int(s["num_samples"], where, f"{n}.num_samples", minimum=1),
                num_tokens=_int(s["num_tokens"], where, f"{n}.num_tokens"),
                sha256=_sha(s["sha256"], where, f"{n}.sha256"),
                num_bytes=_int(s["num_bytes"], where, f"{n}.num_bytes"),
            )
            if info.num_tokens != info.num_samples * seq_len:
                raise _fail(
                    where,
                    f"{n}.num_tokens",
                    f"is {info.num_tokens}; expected num_samples * seq_len = "
                    f"{info.num_samples * seq_len}",
                )
            parsed.append(info)
        splits[split] = parsed

    s = _obj(
        top["sources"],
        where,
        "sources",
        ("inputs", "embedded_documents", "seed", "val_fraction", "documents", "dropped_tokens"),
    )
    if not isinstance(s["inputs"], list):
        raise _fail(where, "sources.inputs", "is not a list")
    inputs = []
    for k, item in enumerate(s["inputs"]):
        n = f"sources.inputs[{k}]"
        item = _obj(item, where, n, ("name", "num_documents"))
        inputs.append(
            InputSource(
                name=_str(item["name"], where, f"{n}.name"),
                num_documents=_int(item["num_documents"], where, f"{n}.num_documents"),
            )
        )
    vf = s["val_fraction"]
    if isinstance(vf, bool) or not isinstance(vf, int | float) or not 0.0 <= vf < 1.0:
        raise _fail(where, "sources.val_fraction", f"is {vf!r}; expected a number in [0, 1)")
    sources = Sources(
        inputs=inputs,
        embedded_documents=_int(s["embedded_documents"], where, "sources.embedded_documents"),
        seed=_int(s["seed"], where, "sources.seed"),
        val_fraction=float(vf),
        documents=_count_map(s["documents"], where, "sources.documents"),
        dropped_tokens=_count_map(s["dropped_tokens"], where, "sources.dropped_tokens"),
    )
    return Manifest(
        format_version=version,
        seq_len=seq_len,
        dtype=dtype,
        tokenizer=tok,
        splits=splits,
        sources=sources,
    )


def check_compatible(
    manifest: Manifest,
    *,
    where: str | Path,
    seq_len: int,
    vocab_size: int | None = None,
    tokenizer_sha256: str | None = None,
    seq_len_key: str = "data.seq_len",
    vocab_size_key: str = "model.vocab_size",
) -> None:
    """Check a dataset against the run's config; raise a DataError naming both sides otherwise.

    ``where`` is the manifest path used in messages. ``vocab_size`` is the model's embedding count:
    it may exceed the tokenizer's (vocabularies are often padded to a multiple of the tensor
    parallel size) but must cover every token id. ``*_key`` name the config fields in messages.
    """
    if manifest.seq_len != seq_len:
        raise DataError(
            f"{where}: seq_len is {manifest.seq_len} but the config's {seq_len_key} is {seq_len}"
        )
    if vocab_size is not None and vocab_size < manifest.tokenizer.vocab_size:
        raise DataError(
            f"{where}: tokenizer.vocab_size is {manifest.tokenizer.vocab_size} but the config's "
            f"{vocab_size_key} is {vocab_size}; the model must have an embedding for every id"
        )
    if tokenizer_sha256 is not None and tokenizer_sha256 != manifest.tokenizer.sha256:
        raise DataError(
            f"{where}: tokenizer.sha256 is {manifest.tokenizer.sha256[:12]}... but the run's "
            f"tokenizer has sha256 {tokenizer_sha256[:12]}...; the data was tokenized differently"
        )
