"""`dlm probe` and `dlm generate`: the probe and the samplers on a trained checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pretrain.checkpoint.marker import add_no_verify_argument


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        nargs="+",
        help="checkpoint or run directories (a run: its latest); several are overlaid in one "
        "figure (overlay.png) next to each one's probe_<label>.json/png",
    )
    parser.add_argument("--prompts", required=True, help="jsonl file, one prompt per line")
    parser.add_argument("--field", default="text", help="jsonl field holding the prompt")
    parser.add_argument("--out", required=True, help="directory for probe.json and probe.png")
    parser.add_argument("--masks", type=int, default=128, help="masks appended (K, default 128)")
    parser.add_argument(
        "--frequent", type=int, default=20, help="size of the high-frequency token set"
    )
    parser.add_argument(
        "--val-batches",
        type=int,
        default=4,
        help="validation batches for the bucketed CE (at most what the split holds: never "
        "repeated; fewer are used, with a message, when it holds less)",
    )
    add_no_verify_argument(parser)
    parser.add_argument(
        "--labels", nargs="*", default=None, help="names of the checkpoints in the figures"
    )


def probe_val_batches(data_path, batch_size: int, requested: int, say=print) -> list:
    """The first `requested` validation batches, clamped to what the split holds so that no
    sequence is evaluated twice (the reader wraps around past the end)."""
    from data_pipeline.manifest import Manifest
    from data_pipeline.reader import eval_batches

    held = Manifest.load(data_path).num_samples("val")
    batch_size = min(batch_size, held)
    usable = held // batch_size if batch_size else 0
    if requested > usable:
        say(
            f"[dlm] --val-batches {requested}: the val split of {data_path} holds {held} "
            f"sequences, {usable} batches of {batch_size}; using {usable}"
        )
    count = min(requested, usable)
    if count == 0:
        return []
    return list(eval_batches(data_path, "val", batch_size=batch_size, num_batches=count, dp_rank=0))


def _label(path: str, taken: set[str]) -> str:
    """`run` for a run directory, `run_step_N` when that name is taken or for a checkpoint."""
    from pretrain.probe.loading import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    run = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
    label = run if run not in taken else f"{run}_{ckpt.name}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def run_probe_command(args: argparse.Namespace) -> int:
    from pretrain.errors import ConfigError
    from pretrain.probe.hook import ModelProbe, read_prompts
    from pretrain.probe.loading import load_model
    from pretrain.probe.probe import frequent_token_ids, plot_profiles

    if args.labels is not None and len(args.labels) != len(args.checkpoint):
        raise ConfigError(
            f"--labels: {len(args.labels)} names for {len(args.checkpoint)} checkpoints"
        )
    out = Path(args.out)
    single = len(args.checkpoint) == 1
    curves, ces, taken = {}, {}, set()
    for i, path in enumerate(args.checkpoint):
        device = ["train.device=cpu"] if not torch.cuda.is_available() else []
        loaded = load_model(path, device, verify=not args.no_verify)
        label = args.labels[i] if args.labels else _label(path, taken)
        taken.add(label)
        tok = loaded.manifest.tokenizer
        prompts = read_prompts(args.prompts, loaded.tokenizer, field=args.field)
        val = []
        if loaded.manifest.splits.get("val") and args.val_batches:
            val = probe_val_batches(
                loaded.cfg.data.path, loaded.cfg.train.micro_batch_size, args.val_batches
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
            decode=lambda i, t=loaded.tokenizer: t.decode([i]),
            title=f"{label}: {len(prompts)} prompts + {args.masks} masks",
        )
        metrics, json_path, png = probe.run(out, name="probe" if single else f"probe_{label}")
        curves[label], ces[label] = probe.last
        print(json.dumps({label: metrics}, indent=1))
        print(f"wrote {json_path} and {png}")
    if not single:
        overlay = plot_profiles(
            curves,
            out / "overlay.png",
            f"probe of {len(curves)} checkpoints: {args.masks} masks after each prompt",
            ces,
        )
        print(f"wrote {overlay}")
    return 0


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or run directory (its latest)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    what.add_argument(
        "--template",
        action="append",
        help="infilling template (repeatable): text with mask spans [MASK:n] (n tokens) or "
        "[MASK] (one) anywhere, e.g. 'The cat [MASK:5] on the mat.'; only the spans are decoded",
    )
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
    parser.add_argument(
        "--mark-spans", action="store_true", help="with --template: print decoded spans in [[ ]]"
    )


def run_generate_command(args: argparse.Namespace) -> int:
    from pretrain.errors import ConfigError
    from pretrain.probe.loading import load_model
    from pretrain.sampling.models import decode_defaults, objective_model_fn
    from pretrain.sampling.sampler import infill
    from pretrain.sampling.template import mark_spans, parse_template

    loaded = load_model(
        args.checkpoint,
        ["train.device=cpu"] if not torch.cuda.is_available() else [],
        verify=not args.no_verify,
    )
    tok = loaded.manifest.tokenizer
    diffusion = loaded.cfg.diffusion
    options = decode_defaults(diffusion, loaded.cfg.data.seq_len)
    options.setdefault("tokens_per_step", args.tokens_per_step)
    if diffusion.objective == "block":
        options["block_origin"] = 0  # the model's blocks are counted from position 0
    if args.block_length:
        options["block_length"] = args.block_length
    if args.order:
        options["order"] = args.order
    model_fn = objective_model_fn(loaded.module, diffusion)
    requests = []
    for text in args.prompt or []:
        ids = loaded.tokenizer.encode(text).ids
        masks = [tok.mask_id] * args.gen_length
        requests.append((torch.tensor(ids + masks), [(len(ids), len(ids) + args.gen_length)]))
    for text in args.template or []:
        template = parse_template(text, loaded.tokenizer, tok.mask_id)
        requests.append((template.ids, template.spans))
    shifted = diffusion.objective == "ar" or (diffusion.objective == "ar_adapt" and diffusion.shift)
    for ids, spans in requests:
        if shifted and spans[0][0] == 0:
            raise ConfigError(
                "--template: this model predicts token i from position i - 1 (shift), so it "
                "cannot decode position 0; start the template with text"
            )
        out = infill(
            model_fn,
            ids[None],
            mask_id=tok.mask_id,
            temperature=args.temperature,
            generator=torch.Generator().manual_seed(args.seed),
            **options,
        )[0].tolist()
        if args.mark_spans and args.template:
            print(mark_spans(loaded.tokenizer, out, spans))
        else:
            print(loaded.tokenizer.decode(out))
    return 0
