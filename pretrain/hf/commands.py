"""`dlm export` and `dlm import` arguments and entry points. Argument parsing imports nothing
heavy (every `dlm` call builds all parsers); the work modules load when a command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPE_CHOICES = ("bfloat16", "float32")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a complete checkpoint directory (step_XXXXXXXX)")
    parser.add_argument("out_dir", help="Hugging Face model directory to write")
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="dataset directory with the tokenizer and manifest (default: the config's data.path)",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split the weights into files of at most this size (default 5GB)",
    )
    parser.add_argument(
        "--no-register",
        action="store_true",
        help="do not log/register the export in the run's MLflow store",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument(
        "--registered-name", help="MLflow registered model name (default: run name)"
    )
    from pretrain.checkpoint.marker import add_no_verify_argument

    add_no_verify_argument(parser)


def run_export(args: argparse.Namespace) -> int:
    from pretrain.hf.export import export_checkpoint

    out = export_checkpoint(
        args.checkpoint,
        args.out_dir,
        data_dir=args.data,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        register=not args.no_register,
        registered_name=args.registered_name,
        overwrite=args.overwrite,
        verify=not args.no_verify,
    )
    print(
        f"wrote {out} (load with AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=True))"
    )
    return 0


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face causal LM directory (Llama / Qwen2 style)")
    parser.add_argument(
        "out_dir",
        nargs="?",
        help="checkpoint directory to write (weights only; default: HF_DIR's name + '-dlm' here)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")


def run_import(args: argparse.Namespace) -> int:
    from pretrain.hf.import_ar import import_causal_lm

    out_dir = args.out_dir or f"{Path(args.hf_dir).resolve().name}-dlm"
    out = import_causal_lm(args.hf_dir, out_dir, overwrite=args.overwrite)
    print(f"wrote {out} (weights-only checkpoint; model config in {out / 'config.yaml'})")
    return 0
