"""One GPU: our full training step against a plain compiled PyTorch step, measured in one run.

    python bench/train_step.py --config configs/llada-1b.yaml --seq 2048 --micro-batch 8 \
        --out results.json [--modes ours,ours+compile,reference,check] [--set key=value ...]

Modes (each in its own process, so none inherits another's memory or compile caches):
  ours           the trainer's step exactly: a batch from the webdataset shards (`TrainData`),
                 the objective's corruption, the DeepSpeed engine (bf16 weights, fp32 master,
                 ZeRO from the config), metrics brought to the host as the trainer does
  ours+compile   the same with `model.compile=true`
  ours+fp8       ours+compile with `model.fp8=tensorwise`: every linear's GEMMs in FP8 (torchao)
  ours+fp8-rowwise  the same with `model.fp8=rowwise`
  reference      `bench/reference.py`: fp32 weights, bf16 autocast, logits at every position,
                 fused AdamW, grad clipping, `torch.compile` of the whole model
  reference+fp8  the reference with torchao's `convert_to_float8_training` (tensorwise) on every
                 linear, the output layer included: what FP8 gives a hand-written step
  check          one batch through ours and through the reference loaded with our weights: the
                 two losses must agree within bf16 tolerance
  check+fp8      the same with ours in FP8 (tensorwise, eager): the loss's FP8 error at init
Shards are built once (`dlm data build --demo`) under --data unless they exist there.

MFU = tokens/s x FLOPs/token / 989e12, the dense bf16 peak of an H100/H200, for every mode: FP8
modes are measured against the same bf16 denominator (not the 1979 TFLOP/s FP8 peak), so MFUs
compare as speeds. FLOPs/token = 6 N + 12 L s d (docs/design.md §8, bidirectional attention in
full). The reference runs the output layer on every position; ours runs it on masked positions
only, so for ours N counts the output layer times the measured masked fraction (`mfu`), and
`mfu_all_positions` credits it as if it ran everywhere, the figure comparable with the
reference's. `fp8_flop_share` is the part of FLOPs/token done by FP8 GEMMs: every linear (6 N)
with `model.fp8`, never attention (12 L s d, cuDNN in bf16). A torch.profiler pass splits device
time into attention, matmuls, loss, optimizer and the rest, and `data_ms` is the host time to
fetch and corrupt a batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profiling import gap_causes, host_profile, host_syncs, profile, sync_trace  # noqa: E402

PEAK_FLOPS = 989e12


def attention_flops_per_token(model, seq: int) -> float:
    """Scores and weighted values, forward and backward, bidirectional in full: 12 L s d."""
    return 12 * model.num_layers * seq * model.hidden_size


def flops_per_token(model, padded_vocab: int, seq: int, head_fraction: float) -> float:
    d, hd = model.hidden_size, model.hidden_size // model.num_attention_heads
    groups = model.num_query_groups or model.num_attention_heads
    per_layer = d * (d + 2 * groups * hd) + d * d + 3 * d * model.ffn_hidden_size
    n = model.num_layers * per_layer + head_fraction * padded_vocab * d
    return 6 * n + attention_flops_per_token(model, seq)


def config(a, compile_layers: bool, fp8: str | None = None):
    from pretrain.config import load_config

    overrides = [
        f"data.path={a.data}",
        f"data.seq_len={a.seq}",
        f"model.compile={str(compile_layers).lower()}",
        f"train.micro_batch_size={a.micro_batch}",
        "train.grad_accum_steps=1",
        f"train.device={a.device}",
        f"train.steps={a.warmup + a.steps + 10}",
        "train.eval_batches=0",
        "tracking.enabled=false",
        *a.set,
        *([f"model.fp8={fp8}"] if fp8 else []),  # the mode's recipe wins over --set
    ]
    return load_config(a.config, overrides)


def build_ours(a, compile_layers: bool, fp8: str | None = None):
    """What the trainer builds for a fresh run (`pretrain.run.build_run`)."""
    from pretrain.run import build_run

    cfg = config(a, compile_layers, fp8)
    run = build_run(cfg, resume=False)
    counter = iter(range(10**9))

    def next_batch():  # the trainer's corruption and host-to-device copies
        return run.step_batches(next(counter))[0]

    return cfg, run, next_batch


def run_ours(a, compile_layers: bool, fp8: str | None = None) -> dict:
    from pretrain.parallel.engine import host_metrics

    cfg, run, next_batch = build_ours(a, compile_layers, fp8)
    engine, recipe = run.engine, run.recipe
    masked, pending = [], []

    def read(metrics):
        masked.extend(host_metrics(m)["masked_fraction"] for m in metrics)
        metrics.clear()

    def step():
        # labelled for --gap-causes (a no-op outside a profiler)
        with record_function("bench: batch"):
            batch = next_batch()
        with record_function("bench: train_step"):
            local = engine.train_step([batch], recipe.loss)  # the trainer's calls
        with record_function("bench: metrics"):
            pending.append(engine.global_metrics(local, recipe.train_metric_names))
            if len(pending) == cfg.train.log_interval:  # the trainer reads at its log lines
                read(pending)

    if a.gap_causes:  # DeepSpeed's calls labelled too, for this diagnostic only
        for name in ("forward", "backward", "step"):
            method = getattr(engine.ds, name)
            setattr(engine.ds, name, labelled(f"deepspeed: {name}", method))

    result = measure(step, a)
    read(pending)
    t0 = time.perf_counter()
    for _ in range(10):
        next_batch()
    result["data_ms"] = (time.perf_counter() - t0) / 10 * 1e3
    fraction = sum(masked) / len(masked) if cfg.model.sparse_output else 1.0
    padded = engine.ds.module.padded_vocab
    # Block diffusion runs the model on [x_t ; x0]: 2L positions per L data tokens, attention
    # counted in full over 2L (its block mask skips about half of it); the head runs on x_t only.
    copies = 2 if cfg.diffusion.objective == "block" else 1
    body = copies * flops_per_token(cfg.model, padded, copies * a.seq, 0.0)
    head = 6 * padded * cfg.model.hidden_size
    result["masked_fraction"] = sum(masked) / len(masked)
    result["flops_per_token"] = body + head * fraction  # masked rows per data token
    result["flops_per_token_all_positions"] = body + head * copies
    # FP8 GEMMs: every linear of the layers, and the head's unless model.fp8_output_layer is
    # off; attention is never FP8
    linear = result["flops_per_token"] - copies * attention_flops_per_token(
        cfg.model, copies * a.seq
    )
    if not cfg.model.fp8_output_layer:
        linear -= head * fraction
    result["fp8_flop_share"] = linear / result["flops_per_token"] if cfg.model.fp8 else 0.0
    result["fp8"] = cfg.model.fp8 or "off"
    result["params"] = sum(p.numel() for p in engine.ds.module.parameters())
    return result


def labelled(label: str, fn):
    def call(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return call


def run_reference(a, fp8: str | None = None) -> dict:
    from reference import build_reference

    from pretrain.config.schema import padded_vocab_size
    from pretrain.diffusion.corruption import CorruptionKey, to_device
    from pretrain.diffusion.objective import build_objective
    from pretrain.parallel.runtime import init_runtime
    from pretrain.run import TrainData

    cfg = config(a, False)
    rt = init_runtime(cfg)
    data = TrainData(cfg, rt)
    mask_id = data.manifest.tokenizer.mask_id
    objective = build_objective(cfg.diffusion, mask_id=mask_id, seq_len=cfg.data.seq_len)
    padded = padded_vocab_size(data.vocab_size, cfg.model.make_vocab_size_divisible_by)
    torch.manual_seed(0)
    model = build_reference(cfg.model, vocab=data.vocab_size, padded_vocab=padded, mask_id=mask_id)
    model.to(a.device)
    if fp8:  # torchao's module swap on the plain model: the FP8 bar a hand-written step reaches
        import dataclasses

        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        from pretrain.model.fp8 import emulation_requested

        fp8_config = Float8LinearConfig.from_recipe_name(fp8)
        if emulation_requested():  # CPU checks of this script: torchao's own emulation
            fp8_config = dataclasses.replace(fp8_config, emulate=True)
        convert_to_float8_training(
            model,
            config=fp8_config,
            module_filter_fn=lambda m, _: all(d % 16 == 0 for d in m.weight.shape),
        )
    cuda = a.device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda)
    forward = torch.compile(model)
    counter = iter(range(10**9))
    losses = []

    def step():
        key = CorruptionKey(cfg.train.seed, next(counter))
        batch = objective.prepare(to_device(next(data.stream), a.device), key)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = forward(batch.inputs, batch.targets, batch.loss_weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if len(losses) == cfg.train.log_interval:  # as ours: the host reads at log lines
            torch.stack(losses).tolist()
            losses.clear()

    result = measure(step, a)
    result["flops_per_token"] = flops_per_token(cfg.model, padded, a.seq, 1.0)
    attention = attention_flops_per_token(cfg.model, a.seq)
    result["fp8_flop_share"] = 1 - attention / result["flops_per_token"] if fp8 else 0.0
    result["fp8"] = fp8 or "off"
    result["params"] = sum(p.numel() for p in model.parameters())
    return result


def run_check(a, fp8: str | None = None) -> dict:
    """Same batch and mask through ours (bf16 DeepSpeed engine, FP8 matmuls with `fp8`) and the
    reference (our weights, bf16 autocast)."""
    from reference import build_reference, load_canonical

    cfg, run, next_batch = build_ours(a, False, fp8)
    engine, objective, data = run.engine, run.recipe.objective, run.data
    step = next_batch()
    batch = step.batch
    with torch.no_grad():
        ours = float(engine.eval_step(step, run.recipe.loss)["loss"])
        module = engine.ds.module
        canonical = {n: p.detach().float() for n, p in engine.canonical_parameters()}
        ref = build_reference(
            cfg.model,
            vocab=data.vocab_size,
            padded_vocab=module.padded_vocab,
            mask_id=objective.mask_id,
        ).to(a.device)
        load_canonical(ref, canonical)
        del canonical
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.device == "cuda"):
            reference = ref(batch.inputs, batch.targets, batch.loss_weights).item()
    return {
        "loss_ours": ours,
        "loss_reference": reference,
        "rel_diff": abs(ours - reference) / abs(reference),
    }


def measure(step_fn, a) -> dict:
    for _ in range(a.warmup):
        step_fn()
    if a.sync_trace:
        sync_trace(step_fn)
    syncs = host_syncs(step_fn) if a.sync_debug else []
    if syncs:
        print("host syncs in a step: " + ", ".join(syncs), flush=True)
    cuda = a.device == "cuda"  # `--device cpu`: the CPU check of this script (no profiles)
    sync = torch.cuda.synchronize if cuda else lambda: None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step_fn()
    sync()
    elapsed = (time.perf_counter() - t0) / a.steps
    if a.gap_causes and cuda:
        gap_causes(step_fn)
    return {
        "step_ms": elapsed * 1e3,
        "tokens_per_s": a.micro_batch * a.seq / elapsed,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "device_ms": profile(step_fn) if a.profile and cuda else {},
        "host_ms": host_profile(step_fn) if a.profile and cuda else {},
        "host_syncs": syncs,
    }


RUNNERS = {
    "ours": lambda a: run_ours(a, False),
    "ours+compile": lambda a: run_ours(a, True),
    "ours+fp8": lambda a: run_ours(a, True, "tensorwise"),
    "ours+fp8-rowwise": lambda a: run_ours(a, True, "rowwise"),
    "reference": run_reference,
    "reference+fp8": lambda a: run_reference(a, "tensorwise"),
    "check": run_check,
    "check+fp8": lambda a: run_check(a, "tensorwise"),
}


def ensure_data(a) -> None:
    if (Path(a.data) / "manifest.json").exists():
        return
    cmd = [sys.executable, "-m", "launcher.cli", "data", "build", "--demo"]
    cmd += ["--demo-documents", str(a.documents)]
    cmd += ["--seq-len", str(a.seq), "--out", a.data]
    subprocess.run(cmd, check=True)


def row(mode: str, r: dict) -> str:
    if "error" in r:
        return f"| {mode} | failed: {r['error'][:120]} |"
    if mode.startswith("check"):
        ours, ref = r["loss_ours"], r["loss_reference"]
        return f"| {mode} | loss ours {ours:.4f} vs reference {ref:.4f} (rel {r['rel_diff']:.1e}) |"
    mfu = r["tokens_per_s"] * r["flops_per_token"] / PEAK_FLOPS
    r["mfu"] = mfu
    extra = ""
    if "flops_per_token_all_positions" in r:
        r["mfu_all_positions"] = r["tokens_per_s"] * r["flops_per_token_all_positions"] / PEAK_FLOPS
        extra = f" ({100 * r['mfu_all_positions']:.1f}% all-positions)"
    split = " ".join(f"{k} {v:.0f}" for k, v in r.get("device_ms", {}).items())
    fp8_share = f"{100 * r.get('fp8_flop_share', 0.0):.0f}%"
    return (
        f"| {mode} | {r['tokens_per_s'] / 1e3:.1f}k | {100 * mfu:.1f}%{extra} | {fp8_share} | "
        f"{r['step_ms']:.0f} | {r['peak_memory_gib']:.1f} | {split} |"
    )


def add_step_arguments(p, config: str, *, micro_batch: int, warmup: int, steps: int, docs: int):
    """The options every one-GPU step benchmark takes (this script's, bench/moe_step.py's)."""
    p.add_argument("--config", default=config)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=micro_batch)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--set", action="append", default=[], help="config override (key=value)")
    p.add_argument("--data", default=None, help="shard directory (built if missing)")
    p.add_argument("--documents", type=int, default=docs, help="demo documents if building")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument(
        "--gap-causes",
        action="store_true",
        help="what the host was doing while the device idled (a CPU+CUDA profile of 3 steps)",
    )
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: checks the script only"
    )


def run_child(script: str, mode: str) -> tuple[dict, subprocess.CompletedProcess]:
    """`script` with this process's arguments, for one mode in a fresh process (no memory or
    compile caches inherited): its RESULT record, or an error."""
    cmd = [sys.executable, script, *sys.argv[1:], "--modes", mode, "--child"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(lines[-1][7:]) if lines else {"error": f"exit {proc.returncode}"}
    return result, proc


def report_child(runner) -> None:
    """In the child process: run one mode and print its RESULT line (an error is reported as a
    result, so the parent goes on with the next mode)."""
    try:
        result = runner()
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_step_arguments(p, "configs/llada-1b.yaml", micro_batch=8, warmup=6, steps=20, docs=20000)
    p.add_argument("--modes", default="check,reference,ours,ours+compile")
    p.add_argument("--sync-debug", action="store_true", help="list host syncs of one step")
    p.add_argument(
        "--sync-trace", action="store_true", help="print the stack of the first host sync in a step"
    )
    p.add_argument("--label", default="", help="name of this configuration in the table")
    p.add_argument("--out", default=None, help="append results as JSON lines here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.data = a.data or f"data/bench-demo-{a.seq}"
    if a.child:
        report_child(lambda: RUNNERS[a.modes](a))
        return
    ensure_data(a)
    if a.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    header = (
        f"{device}, torch {torch.__version__}, python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}: {a.config} seq {a.seq} x "
        f"micro-batch {a.micro_batch} {' '.join(a.set)} {a.label}"
    )
    print(header, flush=True)
    rows = [
        "| mode | tokens/s | MFU (bf16 peak) | FP8 FLOPs | step ms | peak GiB | device ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in a.modes.split(","):
        result, proc = run_child(__file__, mode)
        if "error" in result:
            print(proc.stdout[-1500:], proc.stderr[-3000:], flush=True)
        else:  # the kernel list, and the host time to fetch and corrupt a batch
            keep = ("  ", "host", "first host sync", "no host sync", "idle gaps", "gap causes")
            print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith(keep)))
            # with TORCH_LOGS=recompiles: a recompilation inside the timed steps shows here
            print("\n".join(ln[:300] for ln in proc.stderr.splitlines() if "ecompil" in ln))
            if "data_ms" in result:
                print(f"data: {result['data_ms']:.1f} ms per batch on the host", flush=True)
        rows.append(row(mode, result))
        print(rows[-1], flush=True)
        if a.out:
            record = {"header": header, "mode": mode, "label": a.label, "args": vars(a), **result}
            with open(a.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    print("\n".join([header, *rows]), flush=True)


if __name__ == "__main__":
    main()
