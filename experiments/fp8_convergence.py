"""Does FP8 training converge like bf16? The same model, data, seed and token budget trained twice
on real text, once with bf16 matmuls and once with `model.fp8`, compared by loss curve and final
validation NELBO.

    python experiments/fp8_convergence.py --data DIR --out runs/fp8-convergence \
        [--steps 2500] [--tokens-per-step 16384] [--recipe tensorwise]

DIR is any `dlm data build` directory (manifest.json, tokenizer, shards) of real text; its
`seq_len` and vocabulary set the model's. The default model (`--preset 170m`: d 1024, 12 layers,
16 heads / 4 KV groups, SwiGLU 2816: 135M parameters in the layers plus 2 x vocab x 1024 for
embedding and output layer, 170M with a 16k vocabulary) is sized for both trainings to fit in
about 8 minutes on one H200 with the defaults (a prediction: ~1 GFLOP per token at seq 1024,
41M tokens per run at ~35% MFU is ~2 minutes, plus compilation and start-up), with bf16
weights, fused master-weight AdamW, `model.compile` and ZeRO-0; fp8 adds `model.fp8=RECIPE`.
Each training runs in its own process; under OUT it writes `bf16/` and `fp8-RECIPE/` (run
directories and `train.log`), `curves.json` (per-step training loss and every evaluation of both
runs), `summary.json` (final validation NELBO of each, their relative difference, the largest
relative difference of the smoothed training curves after warmup, tokens, parameters, wall time)
and `fp8_convergence.png` (without matplotlib, `--replot --out OUT` draws it later elsewhere).

`--concurrent` trains both at the same time (each process has its own seed-determined data and
noise, so the curves are those of two sequential runs; only the wall time and tokens/s change).
`--seed-spread` adds a third training, bf16 with seed + 1 (another init, data order and noise):
`summary.json`'s `seed_spread` holds the same differences between the two bf16 runs, the
yardstick for the FP8 ones, and the plot shows both.

`--preset toy --device cpu --emulate-fp8` is the seconds-long CPU check of the script itself
(DLM_FP8_EMULATE=1: the FP8 casts emulated in fp32; no speed-up, no statement about GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    "170m": {
        "model.hidden_size": 1024,
        "model.num_layers": 12,
        "model.num_attention_heads": 16,
        "model.num_query_groups": 4,
        "model.ffn_hidden_size": 2816,
        "model.rope_base": 10000.0,
        "optim.lr": 6e-4,
    },
    "toy": {
        "model.hidden_size": 64,
        "model.num_layers": 2,
        "model.num_attention_heads": 4,
        "model.ffn_hidden_size": 128,
        "optim.lr": 2e-3,
    },
}
"""Model shape and peak learning rate of each preset (everything else is in `overrides`)."""
PLOT = "fp8_convergence.png"
SPREAD = "-other-seed"
"""Suffix of the `--seed-spread` run's name (the bf16 training with seed + 1)."""
SMOOTH = 50
"""Steps in the moving average of the training-loss curves (the per-step loss of a diffusion
LM is noisy: t is drawn per sequence)."""


def overrides(a, name: str, fp8: str | None, seq_len: int, seed: int) -> list[str]:
    micro = max(1, a.tokens_per_step // seq_len)
    values = {
        "run.name": name,
        "run.output_dir": str(a.out),
        "data.path": str(a.data),
        "data.seq_len": seq_len,
        **PRESETS[a.preset],
        "model.compile": a.device == "cuda",
        "model.fp8": fp8 or "off",
        "train.device": a.device,
        "train.steps": a.steps,
        "train.micro_batch_size": micro,
        "train.grad_accum_steps": 1,
        "train.seed": seed,
        "train.log_interval": max(1, min(50, a.steps // 4)),
        "train.eval_interval": max(1, a.steps // a.evals),
        "train.eval_batches": a.eval_batches,
        "train.checkpoint_interval": 0,
        "train.keep_last": 1,
        "train.resume": "never",
        "optim.warmup_steps": max(1, a.steps // 20),
        "optim.min_lr_ratio": 0.1,
        "tracking.enabled": False,
    }
    if a.device == "cuda":
        values |= {"optim.master_weights": "fused", "parallel.zero_stage": 0}
    return [f"{k}={v}" for k, v in values.items()] + a.set


def child(a) -> None:
    """One training run; its losses, evaluations and timing go to OUT/NAME/result.json."""
    from data_pipeline.manifest import Manifest
    from pretrain.config import load_config
    from pretrain.trainer import train

    manifest = Manifest.load(a.data)
    seq_len = manifest.seq_len
    fp8 = a.recipe if a.child.startswith("fp8-") else None
    seed = a.seed + 1 if a.child.endswith(SPREAD) else a.seed
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(a, a.child, fp8, seq_len, seed))
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    tokens = a.steps * cfg.train.micro_batch_size * seq_len
    out = {
        "losses": {str(k): v for k, v in result.losses.items()},
        "evals": {str(k): v for k, v in result.evals.items()},
        "seconds": seconds,
        "tokens": tokens,
        "train_tokens_in_data": manifest.num_samples("train") * seq_len,
        "params": parameters(cfg.model, manifest.tokenizer.vocab_size),
        "fp8": fp8 or "off",
        "seed": seed,
    }
    (Path(a.out) / a.child / "result.json").write_text(json.dumps(out))


def parameters(m, vocab_size: int) -> int:
    """Parameters of the model: layers (QKV, output, SwiGLU, two norms), embedding and output
    layer over the padded vocabulary, final norm."""
    from pretrain.model.transformer import padded_vocab_size

    d, heads = m.hidden_size, m.num_attention_heads
    qkv = d // heads * (heads + 2 * (m.num_query_groups or heads))
    layer = d * qkv + d * d + 3 * d * m.ffn_hidden_size + 2 * d
    vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by)
    return m.num_layers * layer + 2 * vocab * d + d


def smoothed(losses: dict[int, float], window: int) -> dict[int, float]:
    """Trailing moving average over `window` steps (shorter at the start)."""
    steps = sorted(losses)
    values = [losses[s] for s in steps]
    out, total = {}, 0.0
    for i, step in enumerate(steps):
        total += values[i] - (values[i - window] if i >= window else 0.0)
        out[step] = total / min(i + 1, window)
    return out


def final_nelbo(run: dict) -> float:
    """The validation NELBO of a run's last evaluation."""
    return run["evals"][max(run["evals"], key=int)]["val/nelbo_per_token_slot"]


def differences(b: dict, f: dict, warmup: int) -> dict:
    """Run f against run b: relative difference of the final validation NELBO, and the largest
    of the smoothed training curves and of the evaluations after `warmup` steps."""
    final = [final_nelbo(b), final_nelbo(f)]
    window = min(SMOOTH, max(1, len(b["losses"]) // 10))
    sb = smoothed({int(k): v for k, v in b["losses"].items()}, window)
    sf = smoothed({int(k): v for k, v in f["losses"].items()}, window)
    after = [s for s in sb if s > warmup]
    shared = [k for k in b["evals"] if int(k) > warmup and k in f["evals"]]
    evals = max(
        abs(f["evals"][k]["val/nelbo_per_token_slot"] - b["evals"][k]["val/nelbo_per_token_slot"])
        / abs(b["evals"][k]["val/nelbo_per_token_slot"])
        for k in shared
    )
    return {
        "final_val_nelbo_rel_diff": abs(final[1] - final[0]) / abs(final[0]),
        "max_rel_diff_smoothed_train_loss_after_warmup": max(
            abs(sf[s] - sb[s]) / abs(sb[s]) for s in after
        ),
        "max_rel_diff_val_nelbo_after_warmup": evals,
        "smoothing_window_steps": window,
    }


def compare(runs: dict[str, dict], warmup: int) -> dict:
    """The FP8 run against the first (bf16) run; with a `--seed-spread` run, the same
    differences between the two bf16 runs under `seed_spread`."""
    base, name = next(iter(runs)), next(k for k in runs if k.startswith("fp8-"))
    b = runs[base]
    out = {
        "final_val_nelbo": {k: final_nelbo(r) for k, r in runs.items()},
        **differences(b, runs[name], warmup),
        "seconds": {k: r["seconds"] for k, r in runs.items()},
        "tokens_per_run": b["tokens"],
        "train_tokens_in_data": b["train_tokens_in_data"],
        "params": b["params"],
        "tokens_per_s": {k: r["tokens"] / r["seconds"] for k, r in runs.items()},
    }
    if spread := [k for k in runs if k.endswith(SPREAD)]:
        out["seed_spread"] = differences(b, runs[spread[0]], warmup)
    return out


def plot(runs: dict[str, dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
    window = summary["smoothing_window_steps"]
    curves = {}
    for name, run in runs.items():
        curve = smoothed({int(k): v for k, v in run["losses"].items()}, window)
        curves[name] = curve
        (line,) = top.plot(list(curve), list(curve.values()), label=f"{name}: train (avg {window})")
        steps = sorted(int(k) for k in run["evals"])
        nelbo = [run["evals"][str(s)]["val/nelbo_per_token_slot"] for s in steps]
        top.plot(steps, nelbo, "o--", color=line.get_color(), label=f"{name}: validation NELBO")
    base, *others = curves
    b = curves[base]
    for other in others:  # FP8 in black, the seed-spread bf16 run in grey
        rel = {s: 100 * (curves[other][s] - b[s]) / b[s] for s in b}
        colour = "grey" if other.endswith(SPREAD) else "k"
        bottom.plot(list(rel), list(rel.values()), color=colour, label=f"{other} vs {base}")
    bottom.axhline(0, color="grey", lw=0.5)
    for edge in (-1, 1):
        bottom.axhline(edge, color="red", lw=0.5, ls=":")
    top.set_ylabel("NELBO per token slot (nats)")
    bottom.set_ylabel(f"vs {base} (%)")
    bottom.legend(fontsize=7)
    bottom.set_xlabel("step")
    diff = 100 * summary["final_val_nelbo_rel_diff"]
    spread = summary.get("seed_spread")
    top.set_title(
        f"{summary['tokens_per_run'] / 1e6:.1f}M tokens per run; final validation NELBO "
        f"differs by {diff:.2f}%"
        + (f" (two bf16 seeds: {100 * spread['final_val_nelbo_rel_diff']:.2f}%)" if spread else "")
    )
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, type=Path, help="a `dlm data build` directory")
    p.add_argument("--out", default=REPO / "runs" / "fp8-convergence", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), default="170m")
    p.add_argument("--recipe", choices=("tensorwise", "rowwise"), default="tensorwise")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--evals", type=int, default=10, help="evaluations per run")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--concurrent",
        action="store_true",
        help="train both at once (on one GPU: same results, about half the wall time, and "
        "tokens/s that are not benchmarks)",
    )
    p.add_argument(
        "--seed-spread",
        action="store_true",
        help="a third training, bf16 with seed + 1: the spread FP8's differences compare with",
    )
    p.add_argument("--emulate-fp8", action="store_true", help="DLM_FP8_EMULATE=1 (CPU checks)")
    p.add_argument("--set", action="append", default=[], help="extra config override (both runs)")
    p.add_argument("--replot", action="store_true", help="only redraw the plot of OUT's results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    if a.replot:
        runs = json.loads((a.out / "curves.json").read_text())
        plot(runs, json.loads((a.out / "summary.json").read_text()), a.out / PLOT)
        return
    if not (a.data / "manifest.json").exists():
        p.error(f"{a.data}: no manifest.json; build the shards with `dlm data build` first")
    path = os.environ.get("PYTHONPATH")  # kept: a bare GPU machine has its packages there
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *([path] if path else [])])}
    if a.emulate_fp8:
        env["DLM_FP8_EMULATE"] = "1"
    base = "bf16" if a.device == "cuda" else "fp32"  # CPU trains in fp32
    names = [base, f"fp8-{a.recipe}", *([base + SPREAD] if a.seed_spread else [])]
    procs, runs = {}, {}

    def finish(name: str) -> None:
        """Wait for one training; its result, or exit with its log (the others stopped)."""
        if procs[name].wait():
            for other in procs.values():
                other.kill()
            log = (a.out / name / "train.log").read_text()[-3000:]
            sys.exit(f"{name} failed (exit {procs[name].returncode}):\n{log}")
        runs[name] = json.loads((a.out / name / "result.json").read_text())
        print(f"[fp8-convergence] {name}: {runs[name]['seconds']:.0f} s", flush=True)

    for name in names:
        (a.out / name).mkdir(parents=True, exist_ok=True)
        log = a.out / name / "train.log"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name]
        print(f"[fp8-convergence] {name}: training, log in {log}", flush=True)
        with open(log, "w") as f:
            procs[name] = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if not a.concurrent:  # one after the other: a failed first run starts no second
            finish(name)
    for name in names:
        if name not in runs:
            finish(name)
    summary = compare(runs, warmup=max(1, a.steps // 10))
    summary |= {"recipe": a.recipe, "preset": a.preset, "steps": a.steps, "data": str(a.data)}
    summary["concurrent"] = a.concurrent  # both on one GPU at once: their tokens/s are not speeds
    (a.out / "curves.json").write_text(json.dumps(runs))
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    try:
        plot(runs, summary, a.out / PLOT)
    except ImportError as exc:  # a bare GPU machine: the numbers are written, plot elsewhere
        print(f"[fp8-convergence] no plot ({exc}); draw it with --replot --out {a.out}")


if __name__ == "__main__":
    main()
