"""Demo-grammar study of the parallel-decoding gap: agreement error vs tokens per step.

Trains the same small DLM on the built-in grammar corpus (`data_pipeline.grammar`) with the real
trainer (DeepSpeed engine, MLflow, checkpoints) for the same number of steps and tokens, once
without and once with each auxiliary loss, then samples from each checkpoint with k tokens per
model call and scores the subject-verb / determiner-noun agreement of every parsed sentence.

    python experiments/joint_consistency_grammar.py --out runs/jc_study [--steps 1000]
        [--data DIR] [--only NAME ...]

Writes <out>/results_<variant>.json (one record per decoder x tokens-per-step) and prints each
record as a JSON line; docs/joint_consistency.md tabulates them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "baseline": [],
    "self_correction": [{"name": "self_correction"}],
    "energy_nce": [{"name": "energy_nce"}],
    "multistep_consistency": [{"name": "multistep_consistency"}],
}
DECODER = {  # the decoder that goes with each loss
    "baseline": "plain",
    "self_correction": "remask",
    "energy_nce": "energy",
    "multistep_consistency": "remask",
}
HIDDEN, LAYERS, FFN = 128, 4, 352  # configs/tiny.yaml's model
LOOP_STEPS, REMASK_PER_STEP = 16, 4  # budgeted re-masking after the parallel decode


def build_data(out: Path, seq_len: int) -> Path:
    from data_pipeline.build import build_dataset
    from data_pipeline.grammar import generate_documents

    data = out / "data"
    if not (data / "manifest.json").exists():
        build_dataset(
            [],
            data,
            seq_len=seq_len,
            vocab_size=512,
            samples_per_shard=2048,
            val_fraction=0.02,
            seed=0,
            documents=generate_documents(20000, seed=0),
            log=lambda *a: None,
        )
    return data


def train_variant(name: str, data: Path, out: Path, args) -> tuple[Path, float]:
    from pretrain.config import load_config
    from pretrain.trainer import train

    overrides = {
        "run.name": name,
        "run.output_dir": str(out),
        "data.path": str(data),
        "data.seq_len": args.seq_len,
        "model.hidden_size": HIDDEN,
        "model.num_layers": LAYERS,
        "model.num_attention_heads": 4,
        "model.ffn_hidden_size": FFN,
        "train.steps": args.steps,
        "train.micro_batch_size": 32,
        "train.log_interval": 50,
        "train.eval_interval": 0,
        "train.eval_batches": 2,
        "train.checkpoint_interval": 0,
        "train.device": "cpu",
        "optim.lr": 2e-3,
        "optim.warmup_steps": 50,
        "auxiliary.losses": json.dumps(VARIANTS[name]),
        "auxiliary.eval_tokens_per_step": "[1, 8, 64]",
        "auxiliary.eval_samples": 16,
    }
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])
    t0 = time.perf_counter()
    result = train(cfg)
    return result.checkpoint, (time.perf_counter() - t0) / args.steps


def load_model(ckpt: Path, data: Path, seq_len: int):
    from pretrain.checkpoint.manager import open_checkpoint, weight_loader
    from pretrain.config import load_config
    from pretrain.model.parallelize import build_model

    manifest = json.loads((data / "manifest.json").read_text())
    vocab, mask = manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["mask_id"]
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.hidden_size={HIDDEN}",
            f"model.num_layers={LAYERS}",
            "model.num_attention_heads=4",
            f"model.ffn_hidden_size={FFN}",
        ],
    )
    model = build_model(cfg.model, vocab_size=vocab, mask_token_id=mask)
    weight_loader(open_checkpoint(ckpt, num_layers=LAYERS), tp_rank=0, tp_size=1)(
        list(model.named_parameters())
    )
    return model.eval(), vocab, mask


def decode_and_score(name, decoder, model, vocab, mask, data, args) -> list[dict]:
    from data_pipeline.grammar import agreement_error_rate
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.diffusion.auxiliary.base import ModelView
    from pretrain.sampling.consistency import CallCounter, energy_resample, remask_decode
    from pretrain.sampling.sampler import generate

    tok = load_tokenizer(data / "tokenizer.json")
    view = ModelView(model, vocab)
    rows = []
    for k in args.tokens_per_step:
        fn = CallCounter(view.logits)
        gen = torch.Generator().manual_seed(k)
        prompt = torch.zeros(args.samples, 0, dtype=torch.long)
        common = dict(gen_length=args.seq_len, tokens_per_step=k, mask_id=mask, generator=gen)
        stats: dict = {}
        t0 = time.perf_counter()
        if decoder == "plain":
            x = generate(fn, prompt, temperature=1.0, **common)
        elif decoder == "remask":
            x = remask_decode(
                fn,
                torch.full((args.samples, args.seq_len), mask),
                mask_id=mask,
                tokens_per_step=k,
                loop_steps=LOOP_STEPS,
                remask_per_step=REMASK_PER_STEP,
                generator=gen,
                stats=stats,
            )
        else:
            x = energy_resample(
                fn, lambda t: view.energy(t, row=mask), prompt, k=args.candidates, **common
            )
        seconds = time.perf_counter() - t0
        error, parsed = agreement_error_rate([tok.decode(r.tolist()) for r in x])
        rows.append(
            {
                "variant": name,
                "decoder": decoder,
                "tokens_per_step": k,
                "agreement_error": error,
                "parsed_sentences": parsed,
                "model_calls": fn.calls,
                "sequences_through_model": fn.rows,
                "remasked_per_sequence": float(stats["remasked"].float().mean())
                if "remasked" in stats
                else 0.0,
                "decode_seconds": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "jc_study")
    parser.add_argument("--data", type=Path, default=None, help="built shards (default: OUT/data)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or build_data(args.out, args.seq_len)
    for name in args.only:
        ckpt, step_s = train_variant(name, data, args.out, args)
        model, vocab, mask = load_model(ckpt, data, args.seq_len)
        rows = []
        decoders = ["plain"] + ([DECODER[name]] if DECODER[name] != "plain" else ["remask"])
        for decoder in decoders:
            rows += decode_and_score(name, decoder, model, vocab, mask, data, args)
        for row in rows:
            row["train_seconds_per_step"] = step_s
            row["train_steps"] = args.steps
        (args.out / f"results_{name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
