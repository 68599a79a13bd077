"""How long a checkpoint holds up the training loop: synchronous against background saves.

    python bench/checkpoint_stall.py [--config configs/tiny.yaml] [--device cpu|cuda]
        [--seq 32] [--micro-batch 8] [--every 4] [--repeats 3] [--set key=value ...]
        [--dir /tmp/dlm-checkpoint-stall] [--out results.json (appended to)]

One run is built as the trainer builds it (`build_run`); its step is the trainer's
(`run.step_batches` + `engine.train_step` + `engine.global_metrics`). After `--warmup` steps,
windows of `--every` steps are timed, in turn (none, sync, async) `--repeats` times, so a load
that drifts on a shared machine touches every mode alike:

    none    no save: the loop's own time
    sync    a save after the window's first step, `train.checkpoint_async: false`
    async   the same save written in the background (`train.checkpoint_async: true`); the
            window ends only once that write is done (a save every `--every` steps would wait
            for it anyway), so a write longer than the window counts in full

Reported per mode (medians over the repeats): the time the loop spent inside `save()` (sync:
the whole save; async: the DP gathers and the host snapshot), the background write's own time,
the window's wall time (the device drained at its end; median and least) and `stall_per_save_s`
= window time - the `none` window time (median and least): what one save costs the run,
including any slowdown of the steps that run beside a background write (on a CPU the writer
competes with the step for the cores; on a shared machine the least figures are the ones
least disturbed by other jobs).

On a GPU, for llada-1b (about 15 GB of fp32 master weights and Adam moments per checkpoint):

    python bench/checkpoint_stall.py --config configs/llada-1b.yaml --device cuda --seq 2048 \
        --micro-batch 8 --every 10 --repeats 3 --dir /tmp/stall \
        --out bench/results/h200-checkpoint-stall.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODES = ("none", "sync", "async")
WRITTEN = re.compile(r"written in the background in ([0-9.]+) s")
CPU_MODEL = [  # ~13M parameters: ~160 MB of fp32 weights + Adam moments per checkpoint
    "model.hidden_size=512",
    "model.num_layers=4",
    "model.num_attention_heads=8",
    "model.ffn_hidden_size=1408",
]


def config(a):
    from pretrain.config import load_config

    overrides = [
        "run.name=stall",
        f"run.output_dir={a.dir}",
        f"data.path={a.data}",
        f"data.seq_len={a.seq}",
        f"train.micro_batch_size={a.micro_batch}",
        "train.grad_accum_steps=1",
        f"train.device={a.device}",
        f"train.steps={a.warmup + a.repeats * len(MODES) * a.every}",
        "train.eval_batches=0",
        "train.keep_last=1",
        "train.resume=never",
        "tracking.enabled=false",
        *(CPU_MODEL if a.device == "cpu" and a.config.endswith("tiny.yaml") else []),
        *a.set,
    ]
    return load_config(a.config, overrides)


def measure(a) -> dict:
    from pretrain.config import to_yaml
    from pretrain.run import build_run

    cfg = config(a)
    shutil.rmtree(Path(cfg.run.output_dir) / cfg.run.name, ignore_errors=True)
    run = build_run(cfg, resume=False)
    engine, recipe, ckpts = run.engine, run.recipe, run.checkpoints
    cuda = run.rt.device.type == "cuda"
    done = 0

    def drain() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        nonlocal done
        local = engine.train_step(run.step_batches(done), recipe.loss)
        engine.global_metrics(local, recipe.train_metric_names)  # stays on the device
        done += 1

    def window(mode: str) -> tuple[float, float, float]:
        """(window seconds, seconds inside save(), background write seconds)."""
        drain()
        start = time.perf_counter()
        inside, notes = 0.0, []
        for i in range(a.every):
            step()
            if mode != "none" and i == 0:
                ckpts.background = mode == "async"
                state = {"data": run.data.stream.state_dict(), "rng_cpu": torch.get_rng_state()}
                t0 = time.perf_counter()
                ckpts.save(engine, done, trainer_state=state, config_yaml=to_yaml(cfg), wait=False)
                inside = time.perf_counter() - t0
            notes += ckpts.poll()
        drain()
        ckpts.wait()
        elapsed = time.perf_counter() - start
        written = [float(m) for n in notes + ckpts.poll() for m in WRITTEN.findall(n)]
        return elapsed, inside, sum(written)

    for _ in range(a.warmup):
        step()
    times: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    for _ in range(a.repeats):
        for mode in MODES:
            times[mode].append(window(mode))
    latest = ckpts.latest()  # verified: every hash holds
    size = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
    run.close()
    params = sum(p.numel() for _, p in engine.canonical_parameters())
    results = {}
    for mode, rows in times.items():
        results[mode] = {
            "window_s": statistics.median(w for w, _, _ in rows),
            "window_min_s": min(w for w, _, _ in rows),
            "in_save_s": statistics.median(s for _, s, _ in rows),
            "background_write_s": statistics.median(b for _, _, b in rows),
            "windows_s": [w for w, _, _ in rows],
        }
    base, least = results["none"]["window_s"], results["none"]["window_min_s"]
    for r in results.values():
        r["stall_per_save_s"] = r["window_s"] - base
        r["stall_per_save_min_s"] = r["window_min_s"] - least  # the least disturbed windows
    return {"params": params, "checkpoint_bytes": size, "modes": results}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--every", type=int, default=4, help="steps per window (one save in it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="config override (key=value)")
    p.add_argument("--data", default=None, help="shard directory (built if missing)")
    p.add_argument("--documents", type=int, default=3000, help="demo documents if building")
    p.add_argument("--dir", default="/tmp/dlm-checkpoint-stall", help="run directory")
    p.add_argument("--out", default=None, help="append the results to this JSON file")
    a = p.parse_args()
    a.data = a.data or str(REPO / "data" / f"bench-demo-{a.seq}")
    from train_step import ensure_data

    ensure_data(a)
    load_before = os.getloadavg()[0]
    result = measure(a)
    result["load_average"] = [load_before, os.getloadavg()[0]]  # a shared machine's other jobs
    device = (
        torch.cuda.get_device_name(0)
        if a.device == "cuda"
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    )
    result["setup"] = (
        f"{device}, torch {torch.__version__}, python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}: {Path(a.config).name} {result['params'] / 1e6:.1f}M "
        f"params, seq {a.seq} x micro-batch {a.micro_batch}, a save every {a.every} steps "
        f"({result['checkpoint_bytes'] / 1e6:.0f} MB), median of {a.repeats}, load average "
        f"{result['load_average'][0]:.1f} -> {result['load_average'][1]:.1f}"
    )
    print(result["setup"])
    print(
        "| mode | inside save() s | background write s | window s (median / min) "
        "| stall per save s (median / min) |"
    )
    print("|---|---|---|---|---|")
    for mode, r in result["modes"].items():
        print(
            f"| {mode} | {r['in_save_s']:.3f} | {r['background_write_s']:.3f} | "
            f"{r['window_s']:.2f} / {r['window_min_s']:.2f} | "
            f"{r['stall_per_save_s']:.2f} / {r['stall_per_save_min_s']:.2f} |"
        )
    if a.out:  # appended to the runs already there
        out = Path(a.out)
        runs = json.loads(out.read_text())["runs"] if out.exists() else []
        out.write_text(json.dumps({"runs": [*runs, result]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
