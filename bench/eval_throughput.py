"""One GPU: requests/s of `dlm eval` for a random-init llada-1b-shaped model.

    python bench/eval_throughput.py [--config configs/llada-1b.yaml] [--backend megatron|hf]
        [--mc-samples 128] [--batch-size 64] [--out results.jsonl] [--quick]

Measures, each after one warm-up call:
  mc-harness    the local multiple-choice task `dlm_agreement` through lm_eval.simple_evaluate
                (400 documents x 2 choices, ~10-token prompts, 2-6-token continuations)
  gen-harness   the local generation task `dlm_agreement_gen` (max 16 new tokens, stop " .")
  mc-long       synthetic multiple choice at benchmark lengths: --context tokens of context and
                --choices continuations of --continuation tokens (HellaSwag/ARC-like)
  gen-long      synthetic generation: --prompt tokens, --gen-length new tokens in blocks of
                --block-length, --tokens-per-step tokens committed per sampler call
and prints requests/s (and forwards/s, rows/s) per line, JSON lines to --out.

The weights are random (the model's shape, vocabulary and objective are what cost time), the
tokenizer is a BPE trained here on the demo grammar (its ids are valid for the 126k vocabulary).
`--backend megatron` is what `dlm eval CHECKPOINT` runs (our training model at TP = 1); `hf` the
exported `DLMForMaskedLM` that `dlm eval EXPORT_DIR` runs. bf16 on the GPU; CPU works for a smoke
run with `--quick` (a 2-layer model of the same width ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_tokenizer():
    from data_pipeline.grammar import generate_documents
    from data_pipeline.tokenizer import prepare_special_tokens, train_bpe

    tok = train_bpe(generate_documents(2000, seed=0), vocab_size=1024)
    special = prepare_special_tokens(tok)
    tok.encode_special_tokens = True
    return tok, special


def build_model(args, mask_id: int):
    """(net, model config, seq_len) of the config's shape with random weights on the device."""
    from pretrain.config import load_config
    from pretrain.evaluation.backends import HFNet, MegatronNet

    overrides = ["train.device=" + args.device, "model.attention_backend=sdpa", *args.set]
    if args.quick:
        overrides += ["model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=704"]
        overrides += ["model.num_attention_heads=4", "model.num_query_groups=2"]
    cfg = load_config(args.config, overrides)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    vocab = cfg.model.vocab_size
    if args.backend == "hf":
        from pretrain.hf.configuration_dlm import DLMConfig
        from pretrain.hf.modeling_dlm import DLMForMaskedLM
        from pretrain.model.transformer import padded_vocab_size

        m = cfg.model
        config = DLMConfig(
            vocab_size=padded_vocab_size(vocab, m.make_vocab_size_divisible_by),
            prediction_vocab_size=vocab,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups or m.num_attention_heads,
            rope_theta=m.rope_base,
            max_position_embeddings=cfg.data.seq_len,
            mask_token_id=mask_id,
        )
        with torch.device(args.device):
            model = DLMForMaskedLM(config).to(dtype).eval()
        return HFNet(model), cfg
    from pretrain.model.transformer import build_model as build
    from pretrain.parallel.runtime import init_runtime

    init_runtime(cfg)
    module = build(cfg.model, vocab_size=vocab, mask_token_id=mask_id, params_dtype=dtype)
    return MegatronNet(module.to(args.device).eval()), cfg


def synthetic_mc(lm, args, n_docs: int):
    """n_docs documents, each a random context and `choices` random continuations."""
    from lm_eval.api.instance import Instance

    g = torch.Generator().manual_seed(0)
    words = [lm.tok_decode([i]) for i in range(2, 600)]
    requests = []
    for doc in range(n_docs):
        ctx = "".join(
            words[int(i)] for i in torch.randint(0, len(words), (args.context,), generator=g)
        )
        for c in range(args.choices):
            picks = torch.randint(0, len(words), (args.continuation,), generator=g)
            cont = "".join(words[int(i)] for i in picks)
            requests.append(
                Instance("loglikelihood", {}, (ctx, cont), c, metadata=("mc-long", doc, 1))
            )
    return requests


def synthetic_gen(lm, args, n_docs: int):
    from lm_eval.api.instance import Instance

    g = torch.Generator().manual_seed(1)
    words = [lm.tok_decode([i]) for i in range(2, 600)]
    kwargs = {"until": ["<never>"], "max_gen_toks": args.gen_length}
    out = []
    for doc in range(n_docs):
        prompt = "".join(
            words[int(i)] for i in torch.randint(0, len(words), (args.prompt,), generator=g)
        )
        out.append(
            Instance("generate_until", {}, (prompt, kwargs), 0, metadata=("gen-long", doc, 1))
        )
    return out


def timed(fn, *a, **kw):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*a, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "llada-1b.yaml"))
    p.add_argument("--backend", choices=("megatron", "hf"), default="megatron")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mc-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--continuation", type=int, default=16)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--mc-docs", type=int, default=32)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--tokens-per-step", type=int, default=1)
    p.add_argument("--gen-docs", type=int, default=16)
    p.add_argument("--harness-limit", type=int, default=None, help="documents per local task")
    p.add_argument("--quick", action="store_true", help="2-layer model, few documents (smoke)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.mc_docs, args.gen_docs, args.harness_limit = 2, 2, args.harness_limit or 8
        args.context = args.prompt = 32
        args.gen_length, args.block_length, args.mc_samples = 16, 8, 8
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pretrain.config import DiffusionConfig
    from pretrain.evaluation.harness import DLMEvalHarness
    from pretrain.evaluation.loading import EvalModel
    from pretrain.evaluation.runner import evaluate_tasks

    tok, special = build_tokenizer()
    net, cfg = build_model(args, special.mask_id)
    model = EvalModel(
        net=net,
        diffusion=DiffusionConfig(),
        seq_len=cfg.data.seq_len,
        mask_id=special.mask_id,
        eos_id=special.eos_id,
        tokenizer=tok,
        source=f"random {Path(args.config).stem} ({args.backend})",
    )
    lm = DLMEvalHarness(
        model=model,
        mc_samples=args.mc_samples,
        batch_size=args.batch_size,
        block_length=args.block_length,
        tokens_per_step=args.tokens_per_step,
    )
    params = sum(x.numel() for x in net.module.parameters())
    print(f"[bench] {model.source}: {params / 1e9:.2f}B parameters on {args.device}")
    rows = []

    def report(name: str, requests: int, seconds: float, **extra) -> None:
        row = {
            "bench": name,
            "backend": args.backend,
            "requests": requests,
            "seconds": round(seconds, 3),
            "requests_per_s": requests / seconds,
            "mc_samples": args.mc_samples,
            "batch_size": args.batch_size,
            **extra,
        }
        rows.append(row)
        print(json.dumps(row))

    for task in ("dlm_agreement", "dlm_agreement_gen"):
        evaluate_tasks(lm, [task], limit=2)  # warm-up: kernels, caches, task loading
        lm.timing.clear()
        stats = lm.scorer.stats
        forwards = stats.forwards
        results, seconds = timed(evaluate_tasks, lm, [task], limit=args.harness_limit)
        kind, entry = next(iter(results["dlm"]["speed"].items()))
        report(
            "mc-harness" if task == "dlm_agreement" else "gen-harness",
            entry["requests"],
            entry["seconds"],
            task=task,
            harness_seconds=round(seconds, 3),
            forwards=stats.forwards - forwards,
        )

    mc = synthetic_mc(lm, args, args.mc_docs)
    lm.loglikelihood(mc[: args.choices])  # warm-up at this length
    before = (lm.scorer.stats.forwards, lm.scorer.stats.rows)
    _, seconds = timed(lm.loglikelihood, mc)
    report(
        "mc-long",
        len(mc),
        seconds,
        context=args.context,
        continuation=args.continuation,
        forwards=lm.scorer.stats.forwards - before[0],
        rows_per_s=(lm.scorer.stats.rows - before[1]) / seconds,
    )
    gen = synthetic_gen(lm, args, args.gen_docs)
    lm.generate_until(gen[:1])
    _, seconds = timed(lm.generate_until, gen)
    report(
        "gen-long",
        len(gen),
        seconds,
        prompt=args.prompt,
        gen_length=args.gen_length,
        block_length=args.block_length,
        tokens_per_step=args.tokens_per_step,
        tokens_per_s=len(gen) * args.gen_length / seconds,
    )
    print("\n| bench | requests | seconds | requests/s |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['bench']} | {r['requests']} | {r['seconds']:.1f} | {r['requests_per_s']:.2f} |"
        )
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
