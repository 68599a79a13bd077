"""Reading one shard: fetch its bytes (local file or ``pipe:`` command), verify, decode, check.

A shard is located by its manifest name under the dataset directory, or through a URL template
(``shard_url``) in which ``{name}`` is replaced by that name, e.g.
``pipe:aws s3 cp s3://bucket/ds/{name} -``: object stores then work through their own CLIs,
exactly as in webdataset (whose ``gopen`` opens the URL). The manifest and tokenizer always come
from the local dataset directory: they are small and needed before any shard is read.
"""

from __future__ import annotations

import hashlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipeline.manifest import MANIFEST_FILE, SHARD_NAME, Manifest
from pretrain.errors import DataError


def check_shard_name(name: str, where: str) -> str:
    if not SHARD_NAME.fullmatch(name) or ".." in name:
        raise DataError(
            f"{where}: shard name {name!r} is not a plain file name (letters, digits, '.', '_', "
            "'-'; no path separators, spaces or shell characters)"
        )
    return name


@dataclass(frozen=True)
class ShardLocation:
    """Where a shard's bytes come from: a local file (`path`), or a URL/command (`url`) built
    from the user's `shard_url` template. `str()` is what messages show."""

    path: Path | None = None
    url: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else str(self.url)


def shard_location(data_dir: str | Path, name: str, shard_url: str | None = None) -> ShardLocation:
    """Where shard `name` lives: `shard_url` with `{name}` filled in, else `data_dir/name`.

    Without a template the shard is a local file, always opened as one (a name can never turn
    into a URL or command, whatever the data path is). In a `pipe:` template the name is
    shell-quoted; a template whose location is a plain path or `file:` is read as a file too.
    """
    check_shard_name(name, f"{Path(data_dir) / MANIFEST_FILE}")
    if not shard_url:
        return ShardLocation(path=Path(data_dir) / name)
    if shard_url.startswith("pipe:"):
        return ShardLocation(url=shard_url.replace("{name}", shlex.quote(name)))
    filled = shard_url.replace("{name}", name)
    if filled.startswith("file:"):
        return ShardLocation(path=Path(filled.removeprefix("file:")))
    if ":" not in filled.split("/", 1)[0]:
        return ShardLocation(path=Path(filled))
    return ShardLocation(url=filled)


def _fetch(location: ShardLocation, listed: str) -> bytes:
    """All bytes of the shard at `location`; a missing file or failing command names it."""
    if location.path is not None:
        if not location.path.is_file():
            raise DataError(f"{location}: shard is missing; {listed}")
        return location.path.read_bytes()
    try:
        with gopen(location.url, "rb", bufsize=1 << 20) as stream:  # 8 KiB default: 4x slower
            return stream.read()
    except Exception as exc:  # a pipe's non-zero exit status, an unknown scheme, a network error
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if status := re.search(r"\bexit (-?\d+)", detail):  # webdataset's Pipe error text
            detail = f"command exited with status {status.group(1)}"
        raise DataError(f"{location}: could not read the shard ({detail}); {listed}") from exc


def read_shard(
    data_dir: str | Path,
    manifest: Manifest,
    split: str,
    shard: int,
    *,
    verify_checksum: bool = True,
    shard_url: str | None = None,
) -> np.ndarray:
    """Decode shard ``shard`` of ``split`` into a ``[num_samples, seq_len]`` array (manifest dtype).

    Every check names the shard and the manifest, because the user's fix (rebuild, re-copy) is
    per file: missing file, checksum, tar structure, members, lengths (a wrong dtype shows up as a
    wrong byte length), counts and id range.
    """
    data_dir = Path(data_dir)
    info = manifest.splits[split][shard]
    where = shard_location(data_dir, info.name, shard_url)
    listed = f"listed in {data_dir / MANIFEST_FILE}"
    raw = _fetch(where, listed)
    if verify_checksum:
        got = hashlib.sha256(raw).hexdigest()
        if got != info.sha256:
            raise DataError(
                f"{where}: sha256 is {got[:16]}... but the manifest says "
                f"{info.sha256[:16]}...; the shard is corrupt or modified; {listed}"
            )
    try:
        source = [{"url": str(where), "stream": io.BytesIO(raw)}]
        samples = list(group_by_keys(tar_file_expander(source)))
    except Exception as exc:  # tarfile.ReadError, EOFError, ValueError (duplicate member), ...
        detail = " ".join(str(exc.args[0] if exc.args else "").split())  # keep it one line
        raise DataError(
            f"{where}: corrupt or truncated tar ({type(exc).__name__}: {detail}); {listed}"
        ) from exc
    if len(samples) != info.num_samples:
        raise DataError(
            f"{where}: has {len(samples)} samples but the manifest says "
            f"{info.num_samples} (truncated or replaced?); {listed}"
        )
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    nbytes = manifest.seq_len * manifest.itemsize
    # One join + one frombuffer instead of a copy per sample: this loop bounds reader throughput.
    payloads = []
    for sample in samples:
        data = sample.get("tok")
        if data is None:
            members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
            raise DataError(
                f"{where}: sample {sample['__key__']} has no 'tok' member "
                f"(has: {members}); {listed}"
            )
        if len(data) != nbytes:
            raise DataError(
                f"{where}: sample {sample['__key__']} has {len(data)} bytes; expected "
                f"seq_len {manifest.seq_len} x {manifest.itemsize} = {nbytes} "
                f"({manifest.dtype}); {listed}"
            )
        payloads.append(data)
    out = np.frombuffer(b"".join(payloads), dtype=dtype).reshape(len(samples), manifest.seq_len)
    vocab = manifest.tokenizer.vocab_size
    if out.size and int(out.max()) >= vocab:
        row = int(np.argmax(out.max(axis=1) >= vocab))
        raise DataError(
            f"{where}: sample {samples[row]['__key__']} holds token id "
            f"{int(out[row].max())} >= tokenizer.vocab_size {vocab}; {listed}"
        )
    # The mask id marks the positions to predict; one in the data would be a target the model
    # can never see, whose loss is infinite. The build never writes it: this is a damaged or
    # hand-made shard.
    mask = manifest.tokenizer.mask_id
    if (hits := np.flatnonzero(out.reshape(-1) == mask)).size:
        row, col = divmod(int(hits[0]), manifest.seq_len)
        raise DataError(
            f"{where}: sample {samples[row]['__key__']} holds the mask id {mask} at position "
            f"{col}; the mask token must never occur in data (rebuild the dataset); {listed}"
        )
    return out


def check_present(data_dir: Path, manifest: Manifest, split: str, shard_url: str | None) -> list:
    """Indices of the local shards of ``split`` that are missing (URLs are not checked)."""
    missing = []
    for k, info in enumerate(manifest.splits[split]):
        where = shard_location(data_dir, info.name, shard_url)
        if where.path is not None and not where.path.is_file():
            missing.append(k)
    return missing
