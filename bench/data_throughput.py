"""Reader throughput: tokens/s the data pipeline delivers, per loader process and with N workers.

    python bench/data_throughput.py [--seq 2048 --batch 8 --shards 8 --samples-per-shard 1024
                                     --workers 1 2 --seconds 10 --out results.json]

Builds a synthetic dataset once (``--data``, default a temp dir): a byte-level BPE trained on a
little text gives a real tokenizer record, and the blocks are uniform random ids below its vocab
size (the content does not change the cost of reading). Then measures, each for ``--seconds``:

  single          one process, one source, sha256 verified (the default training setting)
  single-noverify the same without the checksum
  mixture         two sources weighted 3:1
  dp8-rank0       rank 0 of 8 data-parallel ranks: each rank decodes every shard it touches but
                  keeps 1/8 of it, so this is the per-GPU rate of a DP=8 job
  pipe            shards read through ``pipe:cat {name}`` (how object-store CLIs are used)
  workers-N       a DataLoader with N worker processes (the trainer's ``data.num_workers``)

The goal (one reader process >= 20x the ~60k tokens/s one H100 trains the 1B DLM at, i.e.
>= 1.2M tokens/s) is checked against ``single`` and printed with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.build import tokenizer_info, write_shards  # noqa: E402
from data_pipeline.loader import LoaderStream  # noqa: E402
from data_pipeline.manifest import (  # noqa: E402
    FORMAT_VERSION,
    Manifest,
    Sources,
    dtype_for_vocab,
)
from data_pipeline.mixing import Source  # noqa: E402
from data_pipeline.tokenizer import TOKENIZER_FILE, prepare_special_tokens, train_bpe  # noqa: E402

GOAL = 1.2e6  # tokens/s: 20x one H100 training the 1B DLM (~60k tokens/s)


def machine() -> dict[str, object]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores_available": cores,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def build_synthetic(out: Path, *, seq: int, shards: int, per_shard: int, seed: int) -> None:
    """A dataset of random blocks with a real tokenizer and a valid manifest."""
    out.mkdir(parents=True, exist_ok=True)
    text = [f"the {w} of the reader is measured in tokens per second" for w in range(2000)]
    tok = train_bpe(text, vocab_size=512)
    special = prepare_special_tokens(tok)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = dtype_for_vocab(vocab)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, vocab, size=(shards * per_shard, seq), dtype=np.uint32)
    infos = write_shards(
        blocks, out, "train", dtype=dtype, samples_per_shard=per_shard, log=lambda _m: None
    )
    tok.save(str(out / TOKENIZER_FILE))
    Manifest(
        format_version=FORMAT_VERSION,
        seq_len=seq,
        dtype=dtype,
        tokenizer=tokenizer_info(tok, special),
        splits={"train": infos},
        sources=Sources(inputs=[], embedded_documents=0, seed=seed, val_fraction=0.0),
    ).save(out)


def measure(stream, batch: int, seq: int, seconds: float) -> dict[str, float]:
    """Tokens/s delivered by ``stream`` (after one warm-up batch) over about ``seconds``."""
    next(stream)
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        x = next(stream)
        assert x.shape == (batch, seq)
        n += 1
    return {"tokens_per_s": n * batch * seq / elapsed, "batches": n, "seconds": elapsed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="dataset dir to (re)use; default: a temp dir")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch (per rank)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples-per-shard", type=int, default=1024)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="dlm-data-bench-")
    root = Path(args.data) if args.data else Path(tmp.name)
    a, b = root / "a", root / "b"
    for seed, d in ((0, a), (1, b)):
        if not (d / "manifest.json").is_file():
            build_synthetic(
                d, seq=args.seq, shards=args.shards, per_shard=args.samples_per_shard, seed=seed
            )
    mb = sum(f.stat().st_size for f in a.glob("*.tar")) / 1e6
    common = {"batch_size": args.batch, "seed": 0}
    cases = {
        "single": lambda: LoaderStream(data_dir=a, **common),
        "single-noverify": lambda: LoaderStream(data_dir=a, verify_checksums=False, **common),
        "mixture": lambda: LoaderStream(
            sources=[Source(str(a), 3.0), Source(str(b), 1.0)], **common
        ),
        "dp8-rank0": lambda: LoaderStream(data_dir=a, dp_rank=0, dp_size=8, **common),
        "pipe": lambda: LoaderStream(
            sources=[Source(str(a), 1.0, f"pipe:cat {a}/{{name}}")], **common
        ),
    }
    for n in args.workers:
        cases[f"workers-{n}"] = lambda n=n: LoaderStream(num_workers=n, data_dir=a, **common)

    info = machine()
    print(f"machine: {info}")
    print(
        f"data: {args.shards} shards x {args.samples_per_shard} blocks x {args.seq} tokens "
        f"({mb:.0f} MB per source), batch {args.batch}"
    )
    results: dict[str, dict[str, float]] = {}
    for name, make in cases.items():
        results[name] = measure(make(), args.batch, args.seq, args.seconds)
        print(f"{name:>16}: {results[name]['tokens_per_s'] / 1e6:8.2f} M tokens/s")
    single = results["single"]["tokens_per_s"]
    verdict = "meets" if single >= GOAL else "MISSES"
    print(
        f"one reader process: {single / 1e6:.2f} M tokens/s = {single / 60e3:.0f}x one H100 "
        f"training the 1B DLM (~60k tokens/s); {verdict} the goal of {GOAL / 1e6:.1f} M tokens/s"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"machine": info, "args": vars(args), "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
