"""The completion marker `COMPLETE.json`: what makes a directory a checkpoint, and its proof.

    {"format": 2, "step": 200, "hash": "xxh3_128",
     "files": {"shards/rank-00000.safetensors": {"size": 52436, "hash": "9f0c..."}, ...}}

Every file of the checkpoint is listed with its size and a content hash; the marker is written
last (after every rank's files) and the directory is renamed into place only after it, so a
listed, matching file set is a complete checkpoint. Verification checks that the directory holds
exactly the listed regular files, each with its size and hash; anything else (a flipped byte, a
truncated file, a shard copied from another step, a planted extra file) is a one-line
`CheckpointError` naming the file.

The hash is XXH3-128 (`xxhash`): about 20 GB/s on one core, 30x faster than BLAKE2b here, so
hashing costs a small fraction of writing the bytes (docs/reliability.md has the figures). It
detects corruption, not forgery: whoever can rewrite a checkpoint can rewrite its marker too,
which is why loading never executes anything a checkpoint holds (`records.py`).

Markers written before hashes (`"files": {name: size}`) still verify, by sizes only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import xxhash

from pretrain.errors import CheckpointError

MARKER = "COMPLETE.json"
FORMAT = 2
HASH = "xxh3_128"
DIGESTS = ".digests"
"""Staging-only folder where each rank leaves the hashes of the files it wrote (removed by the
seal): hashing happens on the rank that wrote the file, while it is still in its page cache."""
MAX_MARKER_BYTES = 64 << 20
_CHUNK = 4 << 20
STEP_DIR = re.compile(r"step_(\d{8,})")


def hash_file(path: Path) -> str:
    """XXH3-128 hex digest of a file's bytes, read in 4 MiB chunks."""
    digest = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a uniquely named temporary file + fsync + `os.replace`, so readers
    see the old or the new content and two writers never share a temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _files(directory: Path) -> list[str]:
    """Relative POSIX names of every non-directory entry below `directory`, marker excluded."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if not p.is_dir() or p.is_symlink()
        if p.relative_to(directory).as_posix() != MARKER
    )


def _hash_many(directory: Path, names: Iterable[str]) -> dict[str, dict]:
    names = list(names)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        digests = pool.map(lambda n: hash_file(directory / n), names)
        return {
            n: {"size": (directory / n).stat().st_size, "hash": d}
            for n, d in zip(names, digests, strict=True)
        }


def record_digests(staging: Path, rank: int, names: list[str]) -> None:
    """Hash the files this rank wrote into `staging` and leave the digests for the seal."""
    folder = staging / DIGESTS
    folder.mkdir(exist_ok=True)
    (folder / f"rank-{rank:05d}.json").write_text(json.dumps(_hash_many(staging, names)))


def write_marker(staging: Path, step: int) -> dict:
    """Collect the ranks' digests, hash every file without one, write `COMPLETE.json`."""
    known: dict[str, dict] = {}
    folder = staging / DIGESTS
    if folder.is_dir():
        for part in sorted(folder.glob("rank-*.json")):
            known.update(json.loads(part.read_text()))
        for part in folder.iterdir():
            part.unlink()
        folder.rmdir()
    names = _files(staging)
    stale = [n for n in names if n not in known or (staging / n).stat().st_size != known[n]["size"]]
    files = {n: known[n] for n in names if n not in stale} | _hash_many(staging, stale)
    marker = {"format": FORMAT, "step": step, "hash": HASH, "files": dict(sorted(files.items()))}
    atomic_write_text(staging / MARKER, json.dumps(marker))
    return marker


def read_marker(path: Path) -> dict:
    """The parsed marker of checkpoint `path`, structurally checked (not yet the files)."""
    marker_path = path / MARKER
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not marker_path.is_file():
        raise CheckpointError(
            f"{path}: incomplete checkpoint (no {MARKER}; the save was interrupted)"
        )
    if marker_path.stat().st_size > MAX_MARKER_BYTES:
        raise CheckpointError(f"{marker_path}: larger than {MAX_MARKER_BYTES >> 20} MiB")
    try:
        marker = json.loads(marker_path.read_text())
        files, step = marker["files"], marker["step"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(
            f"{marker_path}: unreadable marker (expected step and files)"
        ) from None
    if not isinstance(files, dict) or not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(f"{marker_path}: unreadable marker (expected step and files)")
    hashed = marker.get("hash") == HASH
    for name, entry in files.items():
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or pure.as_posix() != name or name == MARKER:
            raise CheckpointError(
                f"{marker_path}: lists {name[:80]!r}; expected paths inside the checkpoint"
            )
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("hash"), str)
            if hashed
            else isinstance(entry, int) and not isinstance(entry, bool)
        )
        if not ok:
            raise CheckpointError(f"{marker_path}: malformed entry for '{name[:80]}'")
    if (m := STEP_DIR.fullmatch(path.name)) and int(m.group(1)) != step:
        raise CheckpointError(f"{marker_path}: says step {step}, the directory is {path.name}")
    return marker


def is_hashed(marker: dict) -> bool:
    return marker.get("hash") == HASH


def verify_checkpoint(path: Path, *, hashes: bool = True, share: tuple[int, int] = (0, 1)) -> dict:
    """Check that `path` is a complete, intact checkpoint; return its marker.

    Always: the marker parses, the directory holds exactly the listed files (regular files, no
    symbolic links), each of the listed size. With `hashes` (and a marker that has them) also
    each file's content hash; `share=(i, n)` hashes only every n-th file from the i-th, so n
    processes verify one checkpoint together (`CheckpointManager.resume_point`).
    """
    path = Path(path)
    marker = read_marker(path)
    files = marker["files"]
    for name in _files(path):
        if name not in files:
            raise CheckpointError(
                f"{path}: file '{name[:80]}' is not listed in {MARKER} (added after the save?)"
            )
    for name, entry in files.items():
        f = path / name
        if f.is_symlink() or not f.is_file():
            what = "a symbolic link" if f.is_symlink() else "missing"
            raise CheckpointError(f"{path}: file '{name}' listed in {MARKER} is {what}")
        size = entry["size"] if isinstance(entry, dict) else entry
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{path}: file '{name}' has {f.stat().st_size} bytes, {MARKER} says {size}"
            )
    if hashes and is_hashed(marker):
        index, count = share
        mine = sorted(files)[index::count]
        try:
            got = _hash_many(path, mine)
        except OSError as exc:  # a bad sector reads as EIO: the file is damaged
            raise CheckpointError(
                f"{path}: cannot read '{exc.filename}' ({exc.strerror or exc})"
            ) from None
        for name in mine:
            if got[name]["hash"] != files[name]["hash"]:
                raise CheckpointError(
                    f"{path}: file '{name}' does not match its content hash in {MARKER} "
                    "(corrupted or replaced after the save)"
                )
    return marker


def add_no_verify_argument(parser) -> None:
    """`--no-verify` for the commands that read checkpoints (export, convert, probe, ...)."""
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help=f"skip the content hashes in {MARKER} (the file set and sizes are still checked)",
    )
