"""What the content hashes of `COMPLETE.json` cost, against the time of writing the checkpoint.

    python bench/checkpoint_hash.py [--gib 1.0] [--dir DIR] [--out results.json]

Two shard files are written the way a checkpoint writes them (`safetensors.save_file` of fp32
tensors, as `write_rank_shard` does): one of the tiny preset's size (configs/tiny.yaml: 1.0M
parameters x {param, exp_avg, exp_avg_sq} = 12 MB) and one of `--gib` GiB. For each, the write
time (save + fsync) is compared with the time to hash the file just written (still in the page
cache, as it is when the writing rank hashes it) with XXH3-128 (what the marker uses), BLAKE2b
and SHA-256, and with `write_marker` itself (the whole seal-time hashing, threads included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.checkpoint.marker import write_marker  # noqa: E402

HASHES = {
    "xxh3_128": xxhash.xxh3_128,
    "blake2b": lambda: hashlib.blake2b(digest_size=32),
    "sha256": hashlib.sha256,
}


def _hash_seconds(path: Path, make) -> float:
    digest, buf = make(), bytearray(4 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    digest.hexdigest()
    return time.perf_counter() - start


def measure(directory: Path, name: str, nbytes: int) -> dict:
    ckpt = directory / name
    (ckpt / "shards").mkdir(parents=True)
    per_kind = nbytes // 3 // 4  # fp32 elements per kind
    rows = max(1, per_kind // 1024)
    tensors = {f"t#{kind}": torch.randn(rows, 1024) for kind in ("param", "exp_avg", "exp_avg_sq")}
    file = ckpt / "shards" / "rank-00000.safetensors"
    start = time.perf_counter()
    save_file(tensors, str(file))
    with open(file, "rb+") as f:
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    size = file.stat().st_size
    result = {"bytes": size, "write_s": write_s, "write_GBps": size / write_s / 1e9}
    for algo, make in HASHES.items():
        best = min(_hash_seconds(file, make) for _ in range(3))
        result[f"{algo}_s"] = best
        result[f"{algo}_GBps"] = size / best / 1e9
        result[f"{algo}_of_write"] = best / write_s
    start = time.perf_counter()
    write_marker(ckpt, 0)
    result["write_marker_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the large file")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {
            "tiny (12 MB)": measure(Path(tmp), "tiny", 12 * 10**6),
            f"{args.gib:g} GiB": measure(Path(tmp), "large", int(args.gib * 2**30)),
        }
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, python {platform.python_version()}")
    print(f"{'file':>14} {'write s':>8} {'xxh3 s':>8} {'xxh3 GB/s':>9} {'/write':>7} "
          f"{'blake2b s':>9} {'/write':>7} {'sha256 s':>8} {'marker s':>8}")  # fmt: skip
    for label, r in results.items():
        print(
            f"{label:>14} {r['write_s']:8.3f} {r['xxh3_128_s']:8.3f} {r['xxh3_128_GBps']:9.1f} "
            f"{r['xxh3_128_of_write']:7.1%} {r['blake2b_s']:9.3f} {r['blake2b_of_write']:7.1%} "
            f"{r['sha256_s']:8.3f} {r['write_marker_s']:8.3f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
