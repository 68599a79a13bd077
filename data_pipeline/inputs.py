"""Input documents for ``dlm data build``: .txt, .jsonl and .parquet files, read in parallel.

Every reader returns the documents of one file as a list of strings and names the file (and the
line or row) in every error, because the fix is always in that file: invalid UTF-8, bad JSON, a
missing text field or column, a non-string value.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from pretrain.errors import DataError

# One or more blank (whitespace-only) lines separate documents in a .txt input.
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
INPUT_TYPES = (".txt", ".jsonl", ".parquet")


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


def read_parquet(path: str | Path, *, text_field: str = "text") -> list[str]:
    """Documents of a .parquet file: the string column ``text_field``, one document per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(
            f"{path}: no column '{text_field}' (columns: {', '.join(names[:8])}); "
            f"choose one with --text-field"
        )
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)):
        raise DataError(f"{path}: column '{text_field}' has type {kind}; expected strings")
    docs: list[str] = []
    row = 0
    try:
        batches = pf.iter_batches(columns=[text_field], batch_size=8192)
        for batch in batches:
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise DataError(
                            f"{path}: row {row}: invalid UTF-8 at byte offset {exc.start} in "
                            f"column '{text_field}'; expected UTF-8 text"
                        ) from exc
                if value and value.strip():
                    docs.append(value)
    except pa.ArrowException as exc:
        raise DataError(f"{path}: near row {row}: could not decode ({exc})") from exc
    if not docs:
        raise DataError(f"{path}: contains no non-empty '{text_field}' documents")
    return docs


READERS: dict[str, Callable[..., list[str]]] = {
    ".txt": lambda path, text_field: read_txt(path),
    ".jsonl": read_jsonl,
    ".parquet": read_parquet,
}


def read_input(path: str | Path, *, text_field: str = "text") -> list[str]:
    """Dispatch on the file extension (registry ``READERS``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise DataError(
            f"{path}: unsupported input type '{suffix or '(none)'}'; expected "
            + ", ".join(INPUT_TYPES)
        )
    return READERS[suffix](path, text_field=text_field)


def read_inputs(
    paths: Sequence[str | Path],
    *,
    text_field: str = "text",
    workers: int = 1,
    progress: bool = False,
) -> list[list[str]]:
    """Documents of every file, in input order; ``workers`` processes read files in parallel.

    The first failing file (in input order) raises its own error, as a sequential read would.
    """
    read = partial(read_input, text_field=text_field)
    workers = max(1, min(workers, len(paths)))
    bar = _progress(len(paths), "read", "files", progress)
    out: list[list[str]] = []
    try:
        if workers == 1:
            for p in paths:
                out.append(read(p))
                bar.update(1)
        else:
            with ProcessPoolExecutor(workers) as pool:
                for docs in pool.map(read, paths):
                    out.append(docs)
                    bar.update(1)
    finally:
        bar.close()
    return out


def default_workers() -> int:
    """CPU cores available to this process."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: bars only on a terminal, so logs and captured stderr stay one line per error.
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True)
