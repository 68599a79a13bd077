"""`dlm probe` and `dlm generate`: the probe and the samplers on a trained checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pretrain.checkpoint.marker import add_no_verify_argument


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or run directory (its latest)")
    parser.add_argument("--prompts", required=True, help="jsonl file, one prompt per line")
    parser.add_argument("--field", default="text", help="jsonl field holding the prompt")
    parser.add_argument("--out", required=True, help="directory for probe.json and probe.png")
    parser.add_argument("--masks", type=int, default=128, help="masks appended (K, default 128)")
    parser.add_argument(
        "--frequent", type=int, default=20, help="size of the high-frequency token set"
    )
    parser.add_argument(
        "--val-batches", type=int, default=4, help="validation batches for the bucketed CE"
    )
    add_no_verify_argument(parser)


def run_probe_command(args: argparse.Namespace) -> int:
    from data_pipeline.reader import eval_batches
    from pretrain.probe.hook import ModelProbe, read_prompts
    from pretrain.probe.loading import load_model
    from pretrain.probe.probe import frequent_token_ids

    loaded = load_model(
        args.checkpoint,
        ["train.device=cpu"] if not torch.cuda.is_available() else [],
        verify=not args.no_verify,
    )
    tok = loaded.manifest.tokenizer
    prompts = read_prompts(args.prompts, loaded.tokenizer, field=args.field)
    val = []
    if loaded.manifest.splits.get("val") and args.val_batches:
        val = list(
            eval_batches(
                loaded.cfg.data.path,
                "val",
                batch_size=loaded.cfg.train.micro_batch_size,
                num_batches=args.val_batches,
                dp_rank=0,
                dp_size=1,
            )
        )
    frequent = frequent_token_ids(val or prompts, args.frequent, (tok.mask_id,))
    probe = ModelProbe.for_module(
        loaded.module,
        mask_id=tok.mask_id,
        eos_id=tok.eos_id,
        prompts=prompts,
        frequent_ids=frequent,
        val=val,
        num_masks=args.masks,
    )
    metrics, json_path, png = probe.run(Path(args.out))
    print(json.dumps(metrics, indent=1))
    print(f"wrote {json_path} and {png}")
    return 0


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or run directory (its latest)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    parser.add_argument("--gen-length", type=int, default=64, help="tokens to generate")
    parser.add_argument("--tokens-per-step", type=int, default=2, help="tokens committed per call")
    parser.add_argument("--block-length", type=int, default=None, help="semi-AR block size")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument(
        "--order",
        default=None,
        help="confidence | schedule | left_to_right (default: what the objective trained)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    add_no_verify_argument(parser)


def run_generate_command(args: argparse.Namespace) -> int:
    from pretrain.probe.loading import load_model
    from pretrain.sampling.models import decode_defaults, objective_model_fn
    from pretrain.sampling.sampler import generate

    loaded = load_model(
        args.checkpoint,
        ["train.device=cpu"] if not torch.cuda.is_available() else [],
        verify=not args.no_verify,
    )
    tok = loaded.manifest.tokenizer
    options = decode_defaults(loaded.cfg.diffusion, loaded.cfg.data.seq_len)
    options.setdefault("tokens_per_step", args.tokens_per_step)
    if args.block_length:
        options["block_length"] = args.block_length
    if args.order:
        options["order"] = args.order
    model_fn = objective_model_fn(loaded.module, loaded.cfg.diffusion)
    for text in args.prompt:
        ids = torch.tensor([loaded.tokenizer.encode(text).ids])
        out = generate(
            model_fn,
            ids,
            gen_length=args.gen_length,
            mask_id=tok.mask_id,
            temperature=args.temperature,
            generator=torch.Generator().manual_seed(args.seed),
            **options,
        )
        print(loaded.tokenizer.decode(out[0].tolist()))
    return 0
