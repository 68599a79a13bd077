"""CLI glue for ``dlm data build``; the ``dlm`` entry point (launcher.cli) wires these in.

Errors are not caught here: :class:`pretrain.errors.DLMError` propagates to the entry point, which
prints ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import argparse

from data_pipeline.build import build_dataset
from data_pipeline.inputs import default_workers
from pretrain.errors import ConfigError

DEFAULT_DEMO_DOCUMENTS = 50000


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dlm data build`` to ``parser``."""
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="input files: .txt (documents separated by blank lines), .jsonl (one JSON object "
        "per line) or .parquet (one document per row); optional with --demo",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output dataset directory (shards, tokenizer.json, manifest.json)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        required=True,
        metavar="N",
        help="tokens per packed training block; must equal the config's data.seq_len",
    )
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument(
        "--tokenizer",
        metavar="PATH",
        default=None,
        help="existing tokenizer.json (or a directory holding one); a <mask> token "
        "is added if missing. Default: train a byte-level BPE on the input",
    )
    tok.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        metavar="N",
        help="vocabulary size of the BPE trained when --tokenizer is not given "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=1024,
        metavar="N",
        help="blocks per webdataset tar shard (default: %(default)s)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="fraction of documents held out for validation, in [0, 1) (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the train/val split and of the demo corpus (default: %(default)s)",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="F",
        help="field (.jsonl) or column (.parquet) holding the text (default: %(default)s)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="add the built-in English-like demo corpus to the documents",
    )
    parser.add_argument(
        "--demo-documents",
        type=int,
        default=DEFAULT_DEMO_DOCUMENTS,
        metavar="N",
        help="number of demo documents generated with --demo (default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it already holds a dataset"
    )
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        default=None,
        metavar="MB",
        help="target shard size; overrides --samples-per-shard (e.g. 256)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes reading input files in parallel (default: all cores)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they go to stderr)"
    )


def run_build(args: argparse.Namespace) -> int:
    """Run ``dlm data build`` with parsed ``args``; returns the process exit status."""
    documents = None
    if args.demo:
        if args.demo_documents < 1:
            raise ConfigError(
                f"--demo-documents is {args.demo_documents}; expected a positive integer"
            )
        # Imported lazily: the grammar is only needed for the demo corpus.
        from data_pipeline.grammar import generate_documents

        documents = generate_documents(args.demo_documents, seed=args.seed)
    elif not args.inputs:
        raise ConfigError("dlm data build: give INPUT files (.txt, .jsonl, .parquet) or --demo")
    build_dataset(
        args.inputs,
        args.out,
        seq_len=args.seq_len,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        samples_per_shard=args.samples_per_shard,
        val_fraction=args.val_fraction,
        seed=args.seed,
        text_field=args.text_field,
        documents=documents,
        overwrite=args.overwrite,
        shard_size_mb=args.shard_size_mb,
        workers=args.workers if args.workers is not None else default_workers(),
        progress=not args.no_progress,
    )
    return 0
