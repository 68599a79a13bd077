"""``dlm data subset``: cut a smaller dataset from a built one, within a size budget.

The first train shards (in manifest order) and the first val shards are copied as they are, with
the tokenizer, so the subset's blocks are byte-identical to the source's and a model trained on
either reads the same ids. The manifest lists only the copied shards (its `sources` still
describe the build they came from); `subset.json` records what was cut. Small side files of the
source directory (e.g. a record of where the text came from) are copied too. Use it to carry a
few MB of a large corpus to another machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from data_pipeline.manifest import MANIFEST_FILE, Manifest
from pretrain.errors import ConfigError, DataError

SIDE_FILE_LIMIT = 1 << 20  # side files above 1 MiB are not copied


def add_subset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="DIR", help="dataset directory built by dlm data build")
    parser.add_argument("--out", required=True, metavar="DIR", help="subset dataset directory")
    parser.add_argument(
        "--max-mb",
        type=float,
        required=True,
        metavar="MB",
        help="size budget of the whole subset (shards, tokenizer, manifest), in MiB",
    )
    parser.add_argument(
        "--val-mb",
        type=float,
        default=4.0,
        metavar="MB",
        help="part of the budget for val shards, in MiB (at least one val shard; default 4)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")


def _take(shards, budget: int, *, at_least_one: bool):
    taken, used = [], 0
    for shard in shards:
        if used + shard.num_bytes > budget and (taken or not at_least_one):
            break
        taken.append(shard)
        used += shard.num_bytes
    return taken, used


def cut_subset(
    source: str | Path, out: str | Path, *, max_mb: float, val_mb: float = 4.0, overwrite=False
) -> Manifest:
    source, out = Path(source), Path(out)
    if max_mb <= 0 or val_mb < 0:
        raise ConfigError(f"--max-mb ({max_mb}) must be positive and --val-mb ({val_mb}) >= 0")
    manifest = Manifest.load(source)
    if out.exists():
        if not overwrite:
            raise DataError(f"{out}: already exists; pass --overwrite to replace it")
        if not (out / MANIFEST_FILE).is_file():
            raise DataError(f"{out}: exists and is not a dataset; refusing to overwrite it")
        shutil.rmtree(out)
    tokenizer = source / manifest.tokenizer.file
    side = [
        p
        for p in sorted(source.iterdir())
        if p.is_file()
        and p.name not in (MANIFEST_FILE, tokenizer.name, "subset.json")
        and not p.name.endswith(".tar")
        and p.stat().st_size <= SIDE_FILE_LIMIT
    ]
    fixed = tokenizer.stat().st_size + sum(p.stat().st_size for p in side) + (64 << 10)
    budget = int(max_mb * (1 << 20)) - fixed
    val, val_used = _take(
        manifest.splits.get("val", []), int(val_mb * (1 << 20)), at_least_one=True
    )
    train, train_used = _take(manifest.splits["train"], budget - val_used, at_least_one=False)
    if not train:
        first = manifest.splits["train"][0].num_bytes / (1 << 20)
        raise ConfigError(
            f"--max-mb {max_mb}: leaves no room for one train shard of {source} ({first:.1f} MiB "
            f"after {(fixed + val_used) / (1 << 20):.1f} MiB of val shards and side files); "
            f"raise --max-mb or rebuild with a smaller --shard-size-mb"
        )
    out.mkdir(parents=True)
    for shard in [*train, *val]:
        shutil.copyfile(source / shard.name, out / shard.name)
    for path in [tokenizer, *side]:
        shutil.copyfile(path, out / path.name)
    splits = {"train": train, **({"val": val} if val else {})}
    subset = dataclasses.replace(manifest, splits=splits)
    subset.save(out)
    record = {
        "source": str(source),
        "source_fingerprint": manifest.fingerprint(),
        "tokens": {k: sum(s.num_tokens for s in v) for k, v in splits.items()},
        "source_tokens": {k: sum(s.num_tokens for s in v) for k, v in manifest.splits.items()},
        "shards": {k: len(v) for k, v in splits.items()},
        "source_shards": {k: len(v) for k, v in manifest.splits.items()},
    }
    (out / "subset.json").write_text(json.dumps(record, indent=1) + "\n")
    return subset


def run_subset(args: argparse.Namespace) -> int:
    subset = cut_subset(
        args.source, args.out, max_mb=args.max_mb, val_mb=args.val_mb, overwrite=args.overwrite
    )
    size = sum(p.stat().st_size for p in Path(args.out).iterdir()) / (1 << 20)
    tokens = {k: sum(s.num_tokens for s in v) for k, v in subset.splits.items()}
    print(
        f"subset {args.out}: {size:.1f} MiB, "
        + ", ".join(
            f"{k} {n:,} tokens in {len(subset.splits[k])} shards" for k, n in tokens.items()
        )
    )
    return 0
