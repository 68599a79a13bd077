"""Multi-GPU correctness and resharding in one command: every layout the GPUs allow against one
GPU, a TP x PP checkpoint resumed at TP1 x PP1 and at DP2, tokens/s per GPU and the share of
device time in communication.

    python bench/multi_gpu.py --out OUT_DIR                  # llada-1b shaped, 4 layers, NCCL
    python bench/multi_gpu.py --device cpu --tiny --gpus 4   # the same sequence on CPU (gloo)

Each layout is one torchrun job running `train()` of the real trainer for --steps steps (the same
global batch for every layout: micro-batch x accumulation x DP is fixed), checkpointing half-way.
Losses are compared per step with the single-device run (bf16 on GPU: relative tolerance 2e-2;
fp32 on CPU: 1e-4). The half-way checkpoint of the largest model-parallel layout is converted to
TP1 x PP1 with `dlm ckpt convert` and resumed in one process and at DP2: their losses must
continue the uninterrupted run.
A timing pass after training measures tokens/s per device and, on CUDA, the share of device time
in NCCL kernels (torch.profiler). Results: OUT_DIR/multi_gpu.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def layouts(gpus: int) -> list[dict[str, int]]:
    """(tp, pp, dp) layouts that fit `gpus` devices, single device first."""
    candidates = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (2, 2, 2)]
    return [dict(tp=t, pp=p, dp=d) for t, p, d in candidates if t * p * d <= gpus]


def name(layout: dict[str, int]) -> str:
    return f"tp{layout['tp']}pp{layout['pp']}dp{layout['dp']}"


def overrides(a, layout: dict[str, int], run: str) -> list[str]:
    micro = a.global_batch // (2 * layout["dp"])
    values = [
        f"data.path={a.data}", f"data.seq_len={a.seq}", f"run.output_dir={a.out}",
        f"run.name={run}",
        f"train.device={a.device}", f"train.steps={a.steps}", f"train.micro_batch_size={micro}",
        "train.grad_accum_steps=2", "train.log_interval=1", "train.eval_interval=0",
        f"train.checkpoint_interval={a.steps // 2}", "train.keep_last=4", "train.eval_batches=0",
        "tracking.enabled=false", f"parallel.tensor_parallel={layout['tp']}",
        f"parallel.pipeline_parallel={layout['pp']}", "parallel.zero_stage=1",
    ]  # fmt: skip
    if not a.tiny:
        values += [
            f"model.num_layers={a.layers}",
            f"model.compile={str(a.device == 'cuda').lower()}",
        ]
    return values


def worker(spec_path: str) -> None:
    """Inside a torchrun job: train, then time steps; rank 0 writes the results."""
    import torch

    from pretrain.config import load_config
    from pretrain.trainer import train

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config(spec["config"], spec["overrides"])
    result = train(cfg, stop_at=spec.get("stop_at"))
    out = {"losses": {str(k): v for k, v in result.losses.items()}}
    if spec.get("time_steps"):
        out.update(timing(cfg, spec["time_steps"]))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["result"]).write_text(json.dumps(out))
    torch.distributed.barrier()


def timing(cfg, steps: int) -> dict:
    """tokens/s per device over `steps` steps, and the NCCL share of device time (CUDA)."""
    import torch

    from pretrain.run import build_run

    run = build_run(cfg, resume=False)
    rt, data, engine, recipe = run.rt, run.data, run.engine, run.recipe

    def step(i: int) -> None:
        local = engine.train_step(run.step_batches(i), recipe.loss)
        engine.global_metrics(local, recipe.train_metric_names)

    for i in range(3):  # warm-up (compilation)
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(3 + i)
    if rt.device.type == "cuda":  # a step leaves its metrics on the device: wait for the last
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - t0) / steps
    out = {"tokens_per_s_per_device": data.global_tokens_per_step / elapsed / rt.world_size}
    if rt.device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                step(100 + i)
            torch.cuda.synchronize()
        total = comm = 0.0
        for event in prof.key_averages():
            us = getattr(event, "device_time_total", 0)
            if event.device_type.name == "CUDA":
                total += us
                comm += us if "nccl" in event.key.lower() else 0.0
        out["communication_share"] = comm / max(total, 1e-9)
    return out


def launch(a, layout: dict[str, int], run: str, **spec) -> dict:
    nproc = layout["tp"] * layout["pp"] * layout["dp"]
    work = Path(a.out) / "specs"
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / f"{run}-{spec.get('stop_at')}.json"
    result = work / f"{run}-{spec.get('stop_at')}.out.json"
    config = "configs/tiny.yaml" if a.tiny else a.config
    spec_file.write_text(
        json.dumps(
            {"config": str(REPO / config), "overrides": overrides(a, layout, run), **spec}
            | {"result": str(result)}
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(port), __file__, "--worker", str(spec_file),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], flush=True)
        return {"error": f"exit {proc.returncode}"}
    return json.loads(result.read_text())


def worst_rel(got: dict, want: dict) -> float:
    steps = sorted(set(got) & set(want), key=int)
    if not steps:
        return float("inf")
    return max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/llada-1b.yaml")
    p.add_argument("--layers", type=int, default=4, help="shortened model (the 1B's width)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--time-steps", type=int, default=10)
    p.add_argument("--gpus", type=int, default=None, help="default: all visible GPUs")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="configs/tiny.yaml shapes (CPU check)")
    p.add_argument("--out", default="runs/multi-gpu")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker)
    import torch

    gpus = a.gpus or torch.cuda.device_count()
    if a.tiny:
        a.seq = 128
    a.data = str(Path(a.out) / f"data-{a.seq}")
    if not (Path(a.data) / "manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "launcher.cli", "data", "build", "--demo", "--demo-documents",
             "4000", "--seq-len", str(a.seq), "--out", a.data],
            check=True, cwd=REPO,
        )  # fmt: skip
    tol = 1e-4 if a.device == "cpu" else 2e-2
    rows, results = [], {}
    for layout in layouts(gpus):
        r = launch(a, layout, name(layout), time_steps=a.time_steps)
        results[name(layout)] = r
        ref = results["tp1pp1dp1"].get("losses", {})
        rel = worst_rel(r.get("losses", {}), ref)
        rows.append(
            (name(layout), r.get("tokens_per_s_per_device"), r.get("communication_share"), rel)
        )
        print(rows[-1], flush=True)
    # Resharding: the half-way checkpoint of the largest model-parallel layout
    source = max((lay for lay in layouts(gpus) if lay["dp"] == 1), key=lambda x: x["tp"] * x["pp"])
    half = f"step_{a.steps // 2:08d}"
    ckpt = Path(a.out) / name(source) / "checkpoints" / half
    straight = results["tp1pp1dp1"].get("losses", {})
    for target in [dict(tp=1, pp=1, dp=1), dict(tp=1, pp=1, dp=2)]:
        if target["tp"] * target["pp"] * target["dp"] > gpus:
            continue
        run = f"resume-{name(source)}-to-{name(target)}"
        run_dir = Path(a.out) / run
        shutil.rmtree(run_dir, ignore_errors=True)
        if (target["tp"], target["pp"]) == (source["tp"], source["pp"]):
            shutil.copytree(ckpt, run_dir / "checkpoints" / half)
            (run_dir / "checkpoints" / "latest").write_text(half + "\n")
        else:
            subprocess.run(
                [sys.executable, "-m", "launcher.cli", "ckpt", "convert", str(ckpt),
                 "--out", str(run_dir / "checkpoints"),
                 "--tp", str(target["tp"]), "--pp", str(target["pp"])],
                check=True, cwd=REPO,
            )  # fmt: skip
        r = launch(a, target, run)
        got = r.get("losses", {})
        ok = sorted(map(int, got)) == list(range(a.steps // 2 + 1, a.steps + 1))
        rows.append((run, None, None, worst_rel(got, straight) if ok else float("inf")))
        print(rows[-1], flush=True)
    Path(a.out, "multi_gpu.json").write_text(json.dumps({"rows": rows, "results": results}))
    head = f"worst loss rel. diff (tol {tol:g})"
    print(f"\n| run | tokens/s per device | communication share | {head} |")
    print("|---|---|---|---|")
    for run, tps, comm, rel in rows:
        tps_s = f"{tps / 1e3:.1f}k" if tps else "-"
        comm_s = f"{100 * comm:.0f}%" if comm is not None else "-"
        verdict = "ok" if rel <= tol else "FAIL"
        print(f"| {run} | {tps_s} | {comm_s} | {rel:.2e} {verdict} |")
    if any(rel > tol for *_, rel in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
