"""One GPU: a mixture-of-experts DLM against a dense DLM with the same active parameters.

    python bench/moe_step.py --out bench/results/moe_step.jsonl

Both run the trainer's step (`pretrain.run.build_run`, as bench/train_step.py's `ours`) on the
demo shards, each mode in its own process:

  moe    configs/llada-moe-7b.yaml's shape (d 2048, 16 layers, 16 heads, expert FFN 1024,
         top-8) with --experts routed experts (32 by default: 3.5B parameters, which fit one
         GPU with the fused optimizer), the data's vocabulary: ~1.1B active parameters
  dense  the same with one SwiGLU of FFN top_k x 1024 = 8192 per layer: the FLOPs of the k
         experts a token visits, so both do the same work per token but the router's

MFU = tokens/s x active FLOPs/token / 989e12 (bf16 dense peak of an H100/H200), FLOPs/token = 6
N_active + 12 L s d, N_active counting the k experts a token visits (and the router), the
output layer on the masked fraction of positions (as train_step's `mfu`). A torch.profiler
pass attributes device time to the MoE layer's forward stages, marked with record_function
ranges in `pretrain.model.moe.MoEBlock`: `moe/router` (gate GEMM, top-k, losses), `moe/dispatch`
(permutation and the all-to-all, none at EP1), `moe/experts` (the expert GEMMs) and
`moe/combine`; `routing_dispatch_share` is (router + dispatch + combine) / the step's wall time
(forward and backward; the backward of those stages is not split out, so this is a lower bound
of their cost); `moe_stage_ms.device_total` sums every kernel's device time for comparison.

`--device cpu --config configs/tiny.yaml ...` runs the script's logic on CPU with a toy model
(tests/test_moe.py does), without profiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profiling import profiled  # noqa: E402 - the bench directory is put on the path just above
from train_step import (  # noqa: E402
    PEAK_FLOPS,
    add_step_arguments,
    attention_flops_per_token,
    build_ours,
    ensure_data,
    measure,
    report_child,
    run_child,
)

STAGES = ("moe/router", "moe/dispatch", "moe/experts", "moe/combine")


def overrides(a, mode: str) -> list[str]:
    # One GPU: no expert parallelism; no activation checkpointing in either mode (on CUDA the
    # MoE layer's recomputation routed tokens differently; the routing replay that fixes it
    # has not been run on a GPU yet: docs/moe.md).
    common = ["parallel.expert_parallel=1", "model.activation_checkpointing=false"]
    if mode == "moe":
        return [
            *common,
            f"model.moe.top_k={a.top_k}",
            f"model.moe.expert_ffn_hidden_size={a.expert_ffn}",
            f"model.moe.num_experts={a.experts}",
        ]
    return [*common, "model.moe.num_experts=0", f"model.ffn_hidden_size={a.top_k * a.expert_ffn}"]


def active_flops_per_token(model, padded_vocab: int, seq: int, head_fraction: float) -> float:
    """6 N_active + attention: a token's k experts (= a dense SwiGLU of k x f_e) and router."""
    d, hd = model.hidden_size, model.hidden_size // model.num_attention_heads
    groups = model.num_query_groups or model.num_attention_heads
    n = 0.0
    for i in range(model.num_layers):
        n += d * (d + 2 * groups * hd) + d * d  # attention projections
        if model.moe.is_moe_layer(i):
            f = model.moe.expert_ffn_hidden_size or model.ffn_hidden_size
            n += 3 * d * f * model.moe.top_k + d * model.moe.num_experts
            n += 3 * d * model.moe.shared_expert_ffn_hidden_size
        else:
            n += 3 * d * model.ffn_hidden_size
    n += head_fraction * padded_vocab * d
    return 6 * n + attention_flops_per_token(model, seq)


def stage_ms(step_fn, steps: int = 3) -> dict[str, float]:
    """Device ms per step inside each MoE stage's record_function range, and the step's total."""
    from torch.profiler import ProfilerActivity

    prof = profiled(step_fn, steps, [ProfilerActivity.CUDA])
    out = dict.fromkeys(STAGES, 0.0)
    total = 0.0
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        us = event.time_range.end - event.time_range.start
        if event.name in out:  # the GPU span of an annotated range
            out[event.name] += us / 1e3 / steps
        elif not event.name.startswith(("moe/", "ProfilerStep")):
            total += us / 1e3 / steps  # kernels and copies
    out["device_total"] = total
    return out


def run(a, mode: str) -> dict:
    from pretrain.parallel.engine import host_metrics

    a.set = [*a.set, *overrides(a, mode)]
    cfg, run_, next_batch = build_ours(a, compile_layers=False)
    engine, recipe = run_.engine, run_.recipe
    masked = []

    def step():
        local = engine.train_step([next_batch()], recipe.loss)
        masked.append(engine.global_metrics(local, recipe.train_metric_names))

    result = measure(step, a)
    fraction = sum(host_metrics(m)["masked_fraction"] for m in masked) / len(masked)
    padded = engine.ds.module.padded_vocab
    result["active_flops_per_token"] = active_flops_per_token(cfg.model, padded, a.seq, fraction)
    result["params"] = sum(p.numel() for p in engine.ds.module.parameters())
    result["mfu_active"] = result["tokens_per_s"] * result["active_flops_per_token"] / PEAK_FLOPS
    if mode == "moe" and a.device == "cuda" and a.profile:
        stages = stage_ms(step)
        result["moe_stage_ms"] = stages
        routing = stages["moe/router"] + stages["moe/dispatch"] + stages["moe/combine"]
        result["routing_dispatch_share"] = routing / result["step_ms"]
        result["experts_share"] = stages["moe/experts"] / result["step_ms"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_step_arguments(p, "configs/llada-moe-7b.yaml", micro_batch=4, warmup=3, steps=10, docs=4000)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--expert-ffn", type=int, default=1024)
    p.add_argument("--modes", default="dense,moe")
    p.add_argument("--out", default=None, help="append results as JSON lines here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.data = a.data or f"data/bench-demo-{a.seq}"
    a.sync_debug = a.sync_trace = False  # what train_step's `measure` reads
    a.set = [*a.set, "model.vocab_size=null"]  # the data's vocabulary: ~1B active parameters
    if a.child:
        report_child(lambda: run(a, a.modes))
        return
    ensure_data(a)
    rows = ["| mode | params | tokens/s | MFU (active) | step ms | peak GiB | routing+dispatch |"]
    rows.append("|---|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        r, proc = run_child(__file__, mode)
        if "error" in r:
            print(proc.stdout[-1500:], proc.stderr[-3000:], flush=True)
            rows.append(f"| {mode} | failed: {r['error'][:120]} |")
        else:
            share = r.get("routing_dispatch_share")
            rows.append(
                f"| {mode} | {r['params'] / 1e9:.2f}B | {r['tokens_per_s'] / 1e3:.1f}k | "
                f"{100 * r['mfu_active']:.1f}% | {r['step_ms']:.0f} | "
                f"{r['peak_memory_gib']:.1f} | {'-' if share is None else f'{100 * share:.1f}%'} |"
            )
        print(rows[-1], flush=True)
        if a.out:
            record = {"mode": mode, "date": time.strftime("%Y-%m-%d"), "args": vars(a), **r}
            with open(a.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    if a.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}, torch {torch.__version__}, seq {a.seq} x micro-batch {a.micro_batch}")
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
