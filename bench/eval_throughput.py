"""Requests/s of `dlm eval`'s model class (`DLMEvalHarness`) on one device.

    python bench/eval_throughput.py --preset llada-1b [--backend module|hf] [--mc-samples 128]
        [--batch-size 64] [--harness] [--out results.jsonl]
    python bench/eval_throughput.py --cpu-smoke          # 2-layer model, seconds, on the CPU

Measures, each after a warm-up call at the same shapes, the harness methods the harness itself
would call, on real text (the demo grammar's sentences, tokenized by a BPE trained here on it):
  mc    `loglikelihood`: --mc-docs multiple-choice documents, each a --context-token passage
        then --choices whole-sentence continuations (HellaSwag/ARC-like lengths), --mc-samples
        Monte-Carlo samples per request
  gen   `generate_until`: --gen-docs prompts of --prompt tokens (one length: full batches),
        --gen-length new tokens committed --tokens-per-step per sampler call (stop sequence
        "\\n\\n", never met by random weights: every request decodes its full length)
and, with --harness, the shipped local tasks through `lm_eval.simple_evaluate` (`dlm_agreement`,
`dlm_agreement_gen`). Prints one JSON line per measurement and a table; appends them to --out.

Without --harness only `lm_eval`'s model interface is imported (`lm_eval.api.model`), whose own
imports (jinja2, requests, tqdm, pyyaml, numpy) are in a CUDA PyTorch image: carry the `lm-eval`
wheel (pure Python, `pip download --no-deps lm-eval==0.4.13`) beside the training wheels of
bench/gpu.sh. --harness also needs the harness's task stack (datasets, evaluate, ...).

The weights are random (the shape, the vocabulary and the objective are what cost time); the
objective is the preset's (`masked` for llada-1b). `--backend module` is what `dlm eval
CHECKPOINT` runs (our training model at TP = 1), `hf` the exported `DLMForMaskedLM` that
`dlm eval EXPORT_DIR` runs. bf16 on the GPU, fp32 on the CPU.
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

SMOKE = [
    "model.num_layers=2",
    "model.hidden_size=128",
    "model.ffn_hidden_size=352",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.vocab_size=1024",
    "data.seq_len=256",
]
"""--cpu-smoke: a 2-layer model of the demo tokenizer's vocabulary."""


def build_tokenizer():
    from data_pipeline.grammar import generate_documents
    from data_pipeline.tokenizer import prepare_special_tokens, train_bpe

    tok = train_bpe(generate_documents(2000, seed=0), vocab_size=1024)
    special = prepare_special_tokens(tok)
    tok.encode_special_tokens = True
    return tok, special


def build_net(args, cfg, mask_id: int):
    """The network of the config's shape with random weights on the device."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    m = cfg.model
    if args.backend == "hf":
        from pretrain.config.schema import padded_vocab_size
        from pretrain.evaluation.backends import HFNet
        from pretrain.hf.configuration_dlm import DLMConfig
        from pretrain.hf.modeling_dlm import DLMForMaskedLM

        config = DLMConfig(
            vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by),
            prediction_vocab_size=m.vocab_size,
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
            return HFNet(DLMForMaskedLM(config).to(dtype).eval())
    from pretrain.evaluation.backends import ModuleNet
    from pretrain.model.parallelize import build_model
    from pretrain.parallel.runtime import init_runtime

    init_runtime(cfg)
    module = build_model(m, vocab_size=m.vocab_size, mask_token_id=mask_id, params_dtype=dtype)
    return ModuleNet(module.to(args.device).eval())


def passages(tok, count: int, length: int, seed: int) -> list[str]:
    """`count` texts of about `length` tokens: consecutive sentences of grammar documents."""
    from data_pipeline.grammar import generate_documents, split_sentences

    sentences = [s for d in generate_documents(400, seed=seed) for s in split_sentences(d)]
    out, i = [], 0
    for _ in range(count):
        text, n = [], 0
        while n < length:
            s = sentences[i % len(sentences)]
            text.append(s)
            n += len(tok.encode(" " + s).ids)
            i += 1
        out.append(" ".join(text))
    return out


def mc_requests(tok, args) -> list:
    """Each document: a passage, then `choices` candidate next sentences (as " sentence")."""
    from lm_eval.api.instance import Instance

    contexts = passages(tok, args.mc_docs, args.context, seed=1)
    endings = passages(tok, args.mc_docs * args.choices, args.continuation, seed=2)
    requests = []
    for doc, ctx in enumerate(contexts):
        for c in range(args.choices):
            cont = " " + endings[doc * args.choices + c]
            requests.append(Instance("loglikelihood", {}, (ctx, cont), c, metadata=("mc", doc, 1)))
    return requests


def gen_requests(tok, args) -> list:
    """Prompts of exactly `--prompt` tokens (passages cut at a token boundary, kept where the
    cut text encodes back to that length), so that they decode in full batches: the decoder
    batches prompts of one length (a bidirectional model must not see padding)."""
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["\n\n"], "max_gen_toks": args.gen_length}
    prompts = []
    for text in passages(tok, 4 * args.gen_docs, args.prompt, seed=3):
        cut = tok.decode(tok.encode(text).ids[: args.prompt])
        if len(tok.encode(cut).ids) == args.prompt and len(prompts) < args.gen_docs:
            prompts.append(cut)
    return [
        Instance("generate_until", {}, (p, dict(kwargs)), 0, metadata=("gen", doc, 1))
        for doc, p in enumerate(prompts)
    ]


def timed(fn, *a, **kw):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*a, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llada-1b", help="configs/PRESET.yaml (default llada-1b)")
    p.add_argument("--config", default=None, help="a config file instead of a preset")
    p.add_argument("--backend", choices=("module", "hf"), default="module")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mc-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward")
    p.add_argument("--mc-docs", type=int, default=32)
    p.add_argument("--context", type=int, default=256, help="tokens of passage per document")
    p.add_argument("--continuation", type=int, default=16, help="tokens per choice (about)")
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--gen-docs", type=int, default=16)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--tokens-per-step", type=int, default=1)
    p.add_argument("--block-length", type=int, default=None, help="semi-AR decode blocks")
    p.add_argument("--harness", action="store_true", help="also the local tasks end to end")
    p.add_argument("--harness-limit", type=int, default=None, help="documents per local task")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, few requests, CPU")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.mc_docs, args.gen_docs = "cpu", 2, 2
        args.context = args.prompt = 32
        args.gen_length, args.mc_samples, args.batch_size = 8, 4, 16
        args.harness_limit = args.harness_limit or 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pretrain.config import load_config
    from pretrain.evaluation.harness import DLMEvalHarness
    from pretrain.evaluation.loading import EvalModel

    config = args.config or str(REPO / "configs" / f"{args.preset}.yaml")
    overrides = [f"train.device={args.device}", "model.attention_backend=sdpa"]
    cfg = load_config(config, overrides + (SMOKE if args.cpu_smoke else []) + args.set)
    tok, special = build_tokenizer()
    net = build_net(args, cfg, special.mask_id)
    source = f"random {Path(config).stem}{' (smoke)' if args.cpu_smoke else ''} ({args.backend})"
    model = EvalModel(
        net=net,
        diffusion=cfg.diffusion,
        seq_len=cfg.data.seq_len,
        mask_id=special.mask_id,
        eos_id=special.eos_id,
        tokenizer=tok,
        source=source,
    )
    lm = DLMEvalHarness(
        model=model,
        mc_samples=args.mc_samples,
        batch_size=args.batch_size,
        tokens_per_step=args.tokens_per_step,
        block_length=args.block_length,
    )
    module = getattr(net, "module", None) or net.model
    params = sum(x.numel() for x in module.parameters())
    print(f"[bench] {source}: {params / 1e9:.3f}B parameters on {args.device}", flush=True)
    rows = []

    def report(name: str, requests: int, seconds: float, **extra) -> None:
        row = {
            "bench": name,
            "model": source,
            "objective": cfg.diffusion.objective,
            "requests": requests,
            "seconds": round(seconds, 3),
            "requests_per_s": requests / seconds,
            "mc_samples": args.mc_samples,
            "batch_size": args.batch_size,
            **extra,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    stats = lm.scorer.stats
    mc = mc_requests(tok, args)
    lm.loglikelihood(mc[: 2 * args.choices])  # warm-up: kernels and allocator at these lengths
    before = (stats.forwards, stats.rows)
    _, seconds = timed(lm.loglikelihood, mc)
    lengths = [len(tok.encode(r.args[0] + r.args[1]).ids) for r in mc]
    report(
        "mc",
        len(mc),
        seconds,
        tokens_per_request=round(sum(lengths) / len(lengths), 1),
        forwards=stats.forwards - before[0],
        rows_per_s=(stats.rows - before[1]) / seconds,
    )
    gen = gen_requests(tok, args)
    lm.generate_until(gen[:1])
    _, seconds = timed(lm.generate_until, gen)
    report(
        "gen",
        len(gen),
        seconds,
        prompt=args.prompt,
        gen_length=args.gen_length,
        tokens_per_step=args.tokens_per_step,
        tokens_per_s=len(gen) * args.gen_length / seconds,
    )
    if args.harness:
        from pretrain.evaluation.runner import evaluate_tasks

        for task in ("dlm_agreement", "dlm_agreement_gen"):
            evaluate_tasks(lm, [task], limit=2)  # warm-up: task loading
            lm.timing.clear()
            results, seconds = timed(evaluate_tasks, lm, [task], limit=args.harness_limit)
            kind, entry = next(iter(results["dlm"]["speed"].items()))
            report(f"harness-{task}", entry["requests"], entry["seconds"], wall_s=seconds)
    print("\n| bench | requests | seconds | requests/s |\n|---|---|---|---|")
    for r in rows:
        rate = r["requests_per_s"]
        print(f"| {r['bench']} | {r['requests']} | {r['seconds']:.1f} | {rate:.2f} |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
