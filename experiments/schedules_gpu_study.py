"""Uniform (`linear`) vs `distance` (several strengths) vs `block` noise schedules at equal
tokens and seed, on real text, from ONE command that fits a 10-minute run on one GPU.

    python experiments/schedules_gpu_study.py --data data/debian-docs/subset-48mb \\
        --out runs/schedules_gpu [--budget-s 540] [--variants linear distance:1 distance:2
        distance:4 block:32] [--seeds 0 1] [--seeded linear distance:2]
    python experiments/schedules_gpu_study.py --toy --data DIR --out DIR   # CPU, seconds

Every run trains the same model (`--size gpu`: d 768, 12 layers, 12 heads, SwiGLU 2048, about
110M parameters with a 16k vocabulary; bf16, fused AdamW) with prefix conditioning (p = 0.5) on
the same data order, for the same number of steps; only `diffusion.schedule` (and its knob)
differs. `--seeds` are the training seeds of the variants named in `--seeded`; the others run
with the first seed only. Runs are in-process (`pretrain.trainer.train`), one after another.

The step count comes from the time budget: a short calibration run of the first variant
measures the seconds per step, the fixed cost per run (engine, final eval, checkpoint) and the
measurements' cost, and the steps are set so that all runs and their measurements fit in
`--budget-s` (never more steps than the training split holds tokens for: no repeated data).
`--steps N` fixes them instead.

Measured for every run (experiments/schedules_gpu_eval.py; the same sequences and masks for
all): the own-schedule validation NELBO (the trainer's final eval) and the linear-schedule
NELBO; the distance-bucketed CE with 95% bootstrap intervals and the far-bucket CE paired
against `linear` of the same seed; the prefix CE; the probe on held-out prompts; and generated
continuations at several tokens per step (unigram / bigram statistics against the validation
text, repetition). Output in --out: results.json (all numbers), table.md, ce_by_distance.png,
probe.png, generation.png, per-run passes (passes/<run>.npz) and the runs themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import schedules_gpu_eval as ev  # noqa: E402

SIZES = {
    "gpu": {
        "model.hidden_size": 768, "model.num_layers": 12, "model.num_attention_heads": 12,
        "model.ffn_hidden_size": 2048, "train.micro_batch_size": 32, "optim.lr": 6e-4,
        "optim.warmup_steps": 50, "optim.master_weights": "fused", "parallel.zero_stage": 0,
        "train.eval_batches": 4,
    },
    "toy": {
        "model.hidden_size": 64, "model.num_layers": 2, "model.num_attention_heads": 4,
        "model.ffn_hidden_size": 128, "train.micro_batch_size": 4, "optim.lr": 2e-3,
        "optim.warmup_steps": 2, "train.eval_batches": 2, "train.device": "cpu",
        "train.precision": "fp32",
    },
}  # fmt: skip
MEASURE = {  # prompt tokens, masks after a probe prompt, generated tokens, prompts, val batches
    "gpu": {"prompt": 32, "masks": 128, "gen": 128, "samples": 64, "val_batches": 8,
            "tokens_per_step": [1, 4, 16, 64]},
    "toy": {"prompt": 8, "masks": 16, "gen": 8, "samples": 4, "val_batches": 2,
            "tokens_per_step": [1, 4]},
}  # fmt: skip


def schedule_overrides(variant: str) -> list[str]:
    """`linear`, `distance:GAMMA`, `block:LENGTH` -> config overrides."""
    name, _, knob = variant.partition(":")
    if name == "linear" and not knob:
        return ["diffusion.schedule=linear"]
    if name == "distance" and knob:
        return ["diffusion.schedule=distance", f"diffusion.distance_strength={float(knob)}"]
    if name == "block" and knob:
        return ["diffusion.schedule=block", f"diffusion.block_length={int(knob)}"]
    raise SystemExit(f"error: variant '{variant}': expected linear, distance:G or block:B")


def run_config(args, variant: str, seed: int, steps: int, name: str):
    from pretrain.config import load_config

    values = {
        **SIZES[args.size],
        "run.name": name,
        "run.output_dir": str(args.out / "runs"),
        "data.path": str(args.data),
        "data.seq_len": args.seq_len,
        "diffusion.prefix_probability": 0.5,
        "train.steps": steps,
        "train.seed": seed,
        "train.log_interval": max(1, min(20, steps // 2)),
        "train.eval_interval": 0,
        "train.checkpoint_interval": 0,
        "train.keep_last": 1,
        "train.resume": "never",
        "tracking.enabled": False,
    }
    if args.compile:
        values["model.compile"] = True
    overrides = [f"{k}={v}" for k, v in values.items()] + schedule_overrides(variant)
    return load_config(REPO / "configs" / "tiny.yaml", overrides)


class _Tee(io.StringIO):
    """Keeps what the trainer prints (for its step times) and still shows it."""

    def write(self, text):
        sys.__stdout__.write(text)
        return super().write(text)


def train_run(cfg) -> tuple[object, float, float | None]:
    """(TrainResult, wall seconds, seconds per step from the trainer's last log window)."""
    from pretrain.trainer import train

    buffer, t0 = _Tee(), time.perf_counter()
    with contextlib.redirect_stdout(buffer):
        result = train(cfg)
    wall = time.perf_counter() - t0
    times = re.findall(r"step_time_s=([0-9.eE+-]+)", buffer.getvalue())
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, wall, float(times[-1]) if times else None


def measure(args, result, val, name: str) -> tuple[dict, dict, object]:
    """The measurements of one finished run -> (summary, raw passes, probe result)."""
    from pretrain.probe.hook import val_prompts
    from pretrain.probe.loading import load_model
    from pretrain.probe.probe import frequent_token_ids, run_probe

    m = MEASURE[args.size]
    device = "cuda" if torch.cuda.is_available() and args.size == "gpu" else "cpu"
    loaded = load_model(result.checkpoint, [f"train.device={device}"])
    tok = loaded.manifest.tokenizer
    module = loaded.module
    passed = ev.masked_pass(module, val, tok.mask_id)
    prefix = ev.prefix_pass(module, val, tok.mask_id, m["prompt"])
    dev = next(module.parameters()).device
    probe = run_probe(
        lambda x: module(x.to(dev)),
        val_prompts(val, 32, m["prompt"]),
        mask_id=tok.mask_id,
        eos_id=tok.eos_id,
        frequent_ids=frequent_token_ids(val, 20, (tok.mask_id,)),
        num_masks=m["masks"],
        decode=lambda i: loaded.tokenizer.decode([i]),
    )
    summary = {
        "masked": ev.summarize_masked(passed),
        "prefix": ev.summarize_prefix(prefix),
        "probe": {"summary": probe.summary(), "buckets": probe.bucket_summary()},
        "generation": ev.generation(
            loaded,
            val,
            prompt_len=m["prompt"],
            gen_length=m["gen"],
            tokens_per_step=m["tokens_per_step"],
            samples=m["samples"],
        ),  # fmt: skip
    }
    # Under passes/ so the report files (results.json, table.md, the figures) stay few at the top.
    (args.out / "passes").mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "passes" / f"{name}.npz", prefix=prefix, **{
        k: v for k, v in passed.items() if isinstance(v, np.ndarray)
    })  # fmt: skip
    return summary, {"masked": passed, "prefix": prefix}, probe


def plan(args, val) -> tuple[int, list[tuple[str, int]]]:
    """The runs (variant, seed) in order of importance and the steps each trains."""
    from data_pipeline.manifest import Manifest

    runs = [(v, args.seeds[0]) for v in args.variants]
    runs += [(v, s) for s in args.seeds[1:] for v in args.variants if v in args.seeded]
    tokens = Manifest.load(args.data).num_samples("train") * args.seq_len
    per_step = SIZES[args.size]["train.micro_batch_size"] * args.seq_len
    most = tokens // per_step  # one pass over the training split, no repeats
    if args.steps:
        return min(args.steps, most), runs
    t0 = time.perf_counter()
    cfg = run_config(args, args.variants[0], args.seeds[0], args.calibration_steps, "calibration")
    result, wall, step_s = train_run(cfg)
    t1 = time.perf_counter()
    measure(args, result, val, "calibration")
    measure_s = time.perf_counter() - t1
    step_s = step_s or wall / args.calibration_steps
    fixed = max(wall - args.calibration_steps * step_s, 0.0)
    left = args.budget_s - (time.perf_counter() - args.started) - args.reserve_s
    per_run = left / len(runs) - fixed - measure_s
    steps = int(max(per_run, 0) / step_s)
    print(
        f"[study] calibration ({time.perf_counter() - t0:.0f} s): {step_s:.3f} s/step, "
        f"{fixed:.0f} s fixed + {measure_s:.0f} s measurements per run; {len(runs)} runs in "
        f"{left:.0f} s -> {steps} steps each (the training split holds {most})",
        flush=True,
    )
    if steps < 10:
        raise SystemExit(f"error: --budget-s {args.budget_s} leaves {steps} steps per run")
    return min(steps, most, args.max_steps or steps), runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset (dlm data build)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--toy", action="store_true", help="tiny CPU settings (a smoke test)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["linear", "distance:2", "block:32", "distance:1", "distance:4"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument(
        "--seeded",
        nargs="*",
        default=["linear", "distance:2"],
        help="variants that also run with the later --seeds",
    )
    parser.add_argument("--steps", type=int, default=None, help="fix the steps (no calibration)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget")
    parser.add_argument("--reserve-s", type=float, default=25.0, help="kept for the report")
    parser.add_argument("--calibration-steps", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the planned steps")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the data's")
    parser.add_argument("--compile", action="store_true", help="model.compile=true")
    args = parser.parse_args()  # fmt: skip
    args.started = time.perf_counter()
    args.size = "toy" if args.toy else "gpu"
    for variant in args.variants:
        schedule_overrides(variant)  # bad names fail before anything runs
    from data_pipeline.manifest import Manifest
    from pretrain.probe.cli import probe_val_batches
    from pretrain.probe.probe import plot_profiles

    args.seq_len = args.seq_len or Manifest.load(args.data).seq_len
    args.out.mkdir(parents=True, exist_ok=True)
    m = MEASURE[args.size]
    val = probe_val_batches(args.data, SIZES[args.size]["train.micro_batch_size"],
                            m["val_batches"])  # fmt: skip
    steps, runs = plan(args, val)
    results, raw, probes = [], {}, {}
    for variant, seed in runs:
        name = f"{variant.replace(':', '')}-s{seed}"
        result, wall, step_s = train_run(run_config(args, variant, seed, steps, name))
        own = result.evals[max(result.evals)].get("val/nelbo_per_token_slot", float("nan"))
        summary, raw[name], probes[name] = measure(args, result, val, name)
        tokens = steps * SIZES[args.size]["train.micro_batch_size"] * args.seq_len
        row = {
            "name": name,
            "variant": variant,
            "seed": seed,
            "steps": steps,
            "train_tokens": tokens,
            "train_seconds": wall,
            "seconds_per_step": step_s,
            "own_nelbo": own,
            **summary,
        }
        base = f"linear-s{seed}"
        if variant != "linear" and base in raw:
            far = slice(ev.PREFIX_FAR - 1, None)  # prefix-CE columns at distance >= PREFIX_FAR
            prefix_far = raw[name]["prefix"][:, far], raw[base]["prefix"][:, far]
            row["vs_linear"] = {
                "far_ce": ev.paired_difference(raw[name]["masked"], raw[base]["masked"]),
                "prefix_far": ev.bootstrap(prefix_far[0].mean(1) - prefix_far[1].mean(1))
                if prefix_far[0].size
                else None,
            }
        results.append(row)
        ev.save_json(args.out / "results.json", results)
        elapsed = time.perf_counter() - args.started
        far = ev.fmt_ci(row["masked"]["far_ce"])
        print(f"[study] {name}: {wall:.0f} s, far CE {far}, {elapsed:.0f} s elapsed", flush=True)
    (args.out / "table.md").write_text(ev.report(results, m["tokens_per_step"]) + "\n")
    ev.figures(results, args.out, m["tokens_per_step"])
    bucketed = {
        r["name"]: {k: {"ce": v["ce"][0]} for k, v in r["masked"]["nearest_visible_ce"].items()}
        for r in results
    }
    plot_profiles(probes, args.out / "probe.png", "probe after held-out prompts", bucketed)
    print((args.out / "table.md").read_text())
    print(f"[study] done in {time.perf_counter() - args.started:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
