"""``dlm data inspect``: what a built dataset holds, read through the same checks as training.

Prints the manifest summary (per split: shards, blocks, tokens, documents = EOS count), decoded
samples with document boundaries marked, and a token-frequency histogram. Shards are decoded by
``read_shard``, so a damaged shard fails here exactly as it would in a run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.manifest import MANIFEST_FILE, Manifest
from data_pipeline.mixing import permutation
from data_pipeline.reader import open_split
from data_pipeline.shards import read_shard
from data_pipeline.tokenizer import check_dataset_tokenizer, load_tokenizer
from pretrain.errors import ConfigError


@dataclass
class SplitStats:
    """Counts of one split over the shards that were read."""

    shards: int
    blocks: int
    tokens: int
    shards_read: int = 0
    documents: int = 0
    """EOS tokens in the shards read (one per document end)."""
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """[vocab] token counts over the shards read."""


def split_stats(
    data_dir: Path, manifest: Manifest, split: str, *, max_shards: int, verify: bool = True
) -> SplitStats:
    """Counts from the manifest plus a token histogram over the first ``max_shards`` shards."""
    shards = manifest.splits[split]
    stats = SplitStats(
        shards=len(shards),
        blocks=sum(s.num_samples for s in shards),
        tokens=sum(s.num_tokens for s in shards),
        histogram=np.zeros(manifest.tokenizer.vocab_size, dtype=np.int64),
    )
    for k in range(min(max_shards, len(shards))):
        blocks = read_shard(data_dir, manifest, split, k, verify_checksum=verify)
        stats.histogram += np.bincount(
            blocks.reshape(-1).astype(np.int64), minlength=manifest.tokenizer.vocab_size
        )
        stats.shards_read += 1
    stats.documents = int(stats.histogram[manifest.tokenizer.eos_id])
    return stats


def inspect_dataset(
    data_dir: str | Path,
    *,
    split: str = "train",
    samples: int = 3,
    top: int = 20,
    max_shards: int = 4,
    seed: int = 0,
    verify: bool = True,
    out: Callable[[str], object] = print,
) -> dict[str, SplitStats]:
    """Print the summary, ``samples`` decoded blocks of ``split`` and the ``top`` tokens."""
    data_dir, manifest, _ = open_split(data_dir, split)
    t = manifest.tokenizer
    if verify:  # the decoded samples below mean something only with the build's tokenizer
        check_dataset_tokenizer(data_dir, t, data_dir / MANIFEST_FILE)
    tok = load_tokenizer(data_dir / t.file)
    out(f"dataset {data_dir}: seq_len {manifest.seq_len}, {manifest.dtype}")
    out(
        f"tokenizer {t.file}: vocab {t.vocab_size}, eos {t.eos_token!r} = {t.eos_id}, "
        f"mask {t.mask_token!r} = {t.mask_id}, sha256 {t.sha256[:12]}..."
    )
    for src in manifest.sources.inputs:
        out(f"input {src.name}: {src.num_documents} documents")
    stats: dict[str, SplitStats] = {}
    for name in manifest.splits:
        s = split_stats(data_dir, manifest, name, max_shards=max_shards, verify=verify)
        stats[name] = s
        read = f"{s.shards_read} of {s.shards} shards read"
        out(
            f"split {name}: {s.shards} shards, {s.blocks} blocks, {s.tokens} tokens, "
            f"{s.documents} documents ended in the {read} "
            f"({manifest.sources.documents.get(name, '?')} documents built, "
            f"{manifest.sources.dropped_tokens.get(name, 0)} trailing tokens dropped)"
        )

    s = stats[split]
    if samples > 0:
        blocks = read_shard(data_dir, manifest, split, 0, verify_checksum=verify)
        rows = permutation(len(blocks), seed, 0)[:samples]
        for r in rows:
            ids = blocks[int(r)].astype(np.int64).tolist()
            # Mark document ends visibly: EOS decodes to nothing with skip_special_tokens.
            text = tok.decode(ids, skip_special_tokens=False).replace(t.eos_token, " ⏎EOS⏎ ")
            out(f"--- {split} sample {int(r)} of {manifest.splits[split][0].name} ---")
            out(text)
    if top > 0 and s.histogram.sum():
        total = int(s.histogram.sum())
        out(f"--- top {top} tokens of {split} ({total} tokens in {s.shards_read} shards) ---")
        for tid in np.argsort(-s.histogram, kind="stable")[:top]:
            count = int(s.histogram[tid])
            if count == 0:
                break
            out(f"{int(tid):>7} {tok.id_to_token(int(tid))!r:<20} {count:>12} {count / total:7.2%}")
        unused = int((s.histogram == 0).sum())
        out(f"{unused} of {len(s.histogram)} token ids never occur in the shards read")
    return stats


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dlm data inspect``."""
    parser.add_argument("data", metavar="DIR", help="dataset directory (with manifest.json)")
    parser.add_argument("--split", default="train", help="split to sample (default: %(default)s)")
    parser.add_argument(
        "--samples", type=int, default=3, metavar="N", help="decoded blocks (default: %(default)s)"
    )
    parser.add_argument(
        "--top", type=int, default=20, metavar="K", help="histogram rows (default: %(default)s)"
    )
    parser.add_argument(
        "--max-shards",
        type=int,
        default=4,
        metavar="N",
        help="shards per split read for counts and histogram (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="which samples (default: %(default)s)")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 checks of the shards read and of the tokenizer",
    )


def run_inspect(args: argparse.Namespace) -> int:
    for key in ("samples", "top", "max_shards"):
        if getattr(args, key) < 0:
            raise ConfigError(f"--{key.replace('_', '-')} is {getattr(args, key)}; expected >= 0")
    inspect_dataset(
        args.data,
        split=args.split,
        samples=args.samples,
        top=args.top,
        max_shards=args.max_shards,
        seed=args.seed,
        verify=not args.no_verify,
    )
    return 0
