"""The sparse output head alone: forward + backward of the output layer and cross-entropy on the
masked rows of one micro-batch, for each way of running it, in one run on the same inputs.

    python bench/head_step.py --config configs/llada-1b.yaml --seq 2048 --micro-batch 8 \
        --out head.jsonl [--vocab 126464] [--masked 0.5] [--compile] [--device cuda]

Variants: `recompute` (the default head: each chunk recomputed in the backward), `stored`
(`model.sparse_output_recompute=false`: the chunk's logit gradient kept from the forward) and,
with `--compile`, `compile_head` (the chunk as one compiled graph). Each prints the head's ms
per forward + backward (CUDA events, median of --repeats), its peak memory above the inputs,
and the largest gradient difference from `recompute` relative to that gradient's largest
magnitude. A part of the step, not a step: bench/train_step.py measures the whole.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

VARIANTS = ("recompute", "stored", "compile_head")


def build_head(cfg, vocab: int, variant: str, device, compiled: bool):
    from pretrain.config.schema import padded_vocab_size
    from pretrain.model.transformer import OutputHead, megatron_config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = megatron_config(cfg.model, params_dtype=dtype)
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by)
    torch.manual_seed(0)
    head = OutputHead(config, vocab, padded, (vocab - 1,), recompute=variant != "stored")
    with torch.no_grad():
        head.output_layer.weight.normal_(0, cfg.model.init_std)
    head = head.to(device)
    if compiled:
        head.compile_loss(whole_chunk=variant == "compile_head")
    return head


def timed(fn, device, repeats: int) -> list[float]:
    """ms of each call of `fn` (CUDA events on a GPU, wall clock on CPU)."""
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None) -> None:
    from pretrain.config import load_config
    from pretrain.parallel.runtime import init_runtime

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=126464, help="real vocabulary size")
    p.add_argument("--masked", type=float, default=0.5, help="fraction of masked positions")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="compile_loss (and compile_head)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    cfg = load_config(a.config, [f"train.device={a.device}"])
    rt = init_runtime(cfg)
    device = rt.device
    g = torch.Generator().manual_seed(1)
    h = cfg.model.hidden_size
    hidden0 = torch.randn(a.seq, a.micro_batch, h, generator=g)
    positions = torch.rand(a.micro_batch, a.seq, generator=g) < a.masked
    targets = torch.randint(0, a.vocab - 1, (a.micro_batch, a.seq), generator=g)
    weights = torch.rand(a.micro_batch, a.seq, generator=g)
    count = int(positions.sum())
    positions, targets, weights = (t.to(device) for t in (positions, targets, weights))
    reference = None
    for variant in VARIANTS if a.compile else VARIANTS[:2]:
        head = build_head(cfg, a.vocab, variant, device, a.compile)
        hidden = hidden0.to(device, head.output_layer.weight.dtype).requires_grad_()

        def step(head=head, hidden=hidden):
            head.zero_grad(set_to_none=True)
            hidden.grad = None
            ce = head.token_ce(hidden, targets, positions, count)
            (ce * weights).sum().backward()

        timed(step, device, 2)  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = timed(step, device, a.repeats)
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
        grads = {"hidden": hidden.grad.float(), "weight": head.output_layer.weight.grad.float()}
        reference = reference or grads
        diff = {
            k: float((grads[k] - reference[k]).abs().max() / reference[k].abs().max())
            for k in grads
        }
        row = {
            "variant": variant,
            "compiled": a.compile,
            "masked_rows": count,
            "ms": statistics.median(ms),
            "peak_gib_above_inputs": peak / 2**30,
            "grad_rel_diff_vs_recompute": diff,
        }
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del head, hidden, grads


if __name__ == "__main__":
    main()
