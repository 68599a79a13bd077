"""Training-step throughput on one GPU: the dlm trainer's step against a hand-written PyTorch step.

    python bench/train_throughput.py [--hidden 2048 --layers 24 --seq 2048 --micro-batch 8 ...]

Modes, each in its own process (so no mode inherits another's memory), on the same model shape and
synthetic tokens, each step including the masked-diffusion corruption and NELBO:
  dlm            Megatron-core layers in a DeepSpeed engine: bf16 weights + fp32 master, ZeRO-1,
                 fused torch AdamW (exactly `pretrain.parallel.engine.build_engine`)
  dlm+compile    the same with `model.compile=true` (torch.compile per transformer layer)
  torch          a plain PyTorch bidirectional transformer of the same shape: fp32 weights,
                 bf16 autocast, fused AdamW, eager
  torch+compile  the same, torch.compile'd as a whole
Prints tokens/s, MFU and peak memory per mode and writes them as JSON (--out).

MFU = tokens/s x FLOPs/token / peak, FLOPs/token = 6 N_matmul + 12 n_layers seq d_model
(DESIGN.md sec. 8; bidirectional attention is full; the output layer runs on every position, as
it does in the trainer), peak = 989e12 (H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

PEAK_FLOPS = 989e12


class RefBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.RMSNorm(d), torch.nn.RMSNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.proj = torch.nn.Linear(d, d, bias=False)
        self.fc1 = torch.nn.Linear(d, 2 * ffn, bias=False)
        self.fc2 = torch.nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):  # x [b, s, d]
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).unbind(2)
        q, k = (rope(t, cos, sin).transpose(1, 2) for t in (q, k))
        att = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))  # bidirectional
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


def rope(t, cos, sin):  # t [b, s, h, hd]
    t1, t2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-t2, t1], dim=-1) * sin


class RefModel(torch.nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ffn: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(RefBlock(d, heads, ffn) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        hd = d // heads
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))

    def forward(self, tokens, targets):
        s = tokens.shape[1]
        freqs = torch.outer(
            torch.arange(s, device=tokens.device).float(), self.inv_freq.to(tokens.device)
        )
        emb = torch.cat([freqs, freqs], -1)[None, :, None, :]
        cos, sin = emb.cos(), emb.sin()
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(
            targets
        )


def flops_per_token(a) -> float:
    per_layer = a.hidden * 3 * a.hidden + a.hidden * a.hidden + 3 * a.hidden * a.ffn
    n_matmul = a.layers * per_layer + a.vocab_padded * a.hidden
    return 6 * n_matmul + 12 * a.layers * a.seq * a.hidden


def batches(a, objective, device):
    from pretrain.diffusion.corruption import CorruptionKey

    gen = torch.Generator().manual_seed(0)
    step = 0
    while True:
        x0 = torch.randint(0, a.vocab - 1, (a.micro_batch, a.seq), generator=gen)
        yield objective.prepare(x0.to(device), CorruptionKey(0, step))
        step += 1


def phase_times(phases, a) -> dict[str, float]:
    """Mean ms of each phase of a step, with a device sync between phases (slower than a real
    step, which overlaps them: for locating time, not for throughput)."""
    totals = dict.fromkeys(phases, 0.0)
    for _ in range(a.steps):
        state = None
        for name, fn in phases.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            state = fn(state)
            torch.cuda.synchronize()
            totals[name] += time.perf_counter() - t0
    return {name: 1e3 * t / a.steps for name, t in totals.items()}


def measure(name, phases, a, tokens_per_step) -> dict:
    def step_fn():
        state = None
        for fn in phases.values():
            state = fn(state)

    torch.cuda.synchronize()
    for _ in range(a.warmup):
        step_fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step_fn()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tps = tokens_per_step * a.steps / elapsed
    result = {
        "mode": name,
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token(a) / PEAK_FLOPS,
        "step_s": elapsed / a.steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "phase_ms": phase_times(phases, a),
    }
    return result


def run_dlm(a, compile_layers: bool, overrides: list[str]) -> dict:
    from pretrain.config import load_config
    from pretrain.diffusion.objective import build_objective
    from pretrain.parallel.engine import build_engine
    from pretrain.parallel.runtime import init_runtime

    cfg = load_config(
        None,
        [
            f"model.hidden_size={a.hidden}", f"model.num_layers={a.layers}",
            f"model.num_attention_heads={a.heads}", f"model.ffn_hidden_size={a.ffn}",
            f"model.compile={str(compile_layers).lower()}", f"data.seq_len={a.seq}",
            f"train.micro_batch_size={a.micro_batch}", "train.device=cuda", "parallel.zero_stage=1",
            f"train.steps={a.warmup + a.steps}", *overrides,
        ],
    )  # fmt: skip
    rt = init_runtime(cfg)
    objective = build_objective(cfg.diffusion, mask_id=a.vocab - 1)
    engine = build_engine(
        cfg, rt, vocab_size=a.vocab, mask_token_id=a.vocab - 1, objective=objective
    )
    data = batches(a, objective, rt.device)
    ds = engine.ds
    ds.train()

    def forward(_):
        batch = next(data)
        return objective.loss(ds(batch.inputs, targets=batch.targets), batch)[0]

    phases = {"forward": forward, "backward": ds.backward, "optimizer": lambda _: ds.step()}
    name = "dlm+compile" if compile_layers else "dlm"
    return measure("@".join([name, *overrides]), phases, a, a.micro_batch * a.seq)


def run_torch(a, compiled: bool) -> dict:
    from pretrain.config import DiffusionConfig
    from pretrain.diffusion.objective import build_objective

    torch.manual_seed(0)
    model = RefModel(a.vocab_padded, a.hidden, a.layers, a.heads, a.ffn).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    objective = build_objective(DiffusionConfig(), mask_id=a.vocab - 1)
    forward = torch.compile(model) if compiled else model
    data = batches(a, objective, torch.device("cuda"))

    def forward_loss(_):
        batch = next(data)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ce = forward(batch.inputs, batch.targets)
        return objective.loss(ce, batch)[0]

    def optimizer_step(_):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    phases = {
        "forward": forward_loss,
        "backward": lambda loss: loss.backward(),
        "optimizer": optimizer_step,
    }
    return measure("torch+compile" if compiled else "torch", phases, a, a.micro_batch * a.seq)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--modes",
        default="dlm,dlm+compile,torch,torch+compile",
        help="comma-separated; dlm modes take config overrides: dlm@parallel.zero_stage=0",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.vocab_padded = math.ceil(a.vocab / 128) * 128
    props = torch.cuda.get_device_properties(0)
    if not a.child:
        print(
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
            f"python {platform.python_version()}; model d={a.hidden} L={a.layers} "
            f"heads={a.heads} ffn={a.ffn} vocab={a.vocab}, seq {a.seq} x micro-batch "
            f"{a.micro_batch}, {flops_per_token(a) / 1e9:.2f} GFLOP/token",
            flush=True,
        )
    runners = {
        "dlm": lambda extra: run_dlm(a, False, extra),
        "dlm+compile": lambda extra: run_dlm(a, True, extra),
        "torch": lambda extra: run_torch(a, False),
        "torch+compile": lambda extra: run_torch(a, True),
    }
    modes = a.modes.split(",")
    if a.child:  # one mode, in this process; `dlm@key=value@...` adds config overrides
        name, *extra = modes[0].split("@")
        try:
            result = runners[name](extra)
        except Exception as exc:  # report what broke; the parent goes on with the next mode
            traceback.print_exc()
            result = {"mode": modes[0], "error": f"{type(exc).__name__}: {exc}"[:500]}
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for mode in modes:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--modes", mode, "--child"]
        cmd = [c for i, c in enumerate(cmd) if not (c == "--out" or cmd[i - 1] == "--out")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            results.append(json.loads(lines[-1][len("RESULT ") :]))
        else:
            print(proc.stdout[-2000:], proc.stderr[-4000:], flush=True)
            results.append({"mode": mode, "error": f"exit {proc.returncode}"})
        if "error" not in results[-1]:
            r = results[-1]
            phases = " ".join(f"{k} {v:.1f}" for k, v in r["phase_ms"].items())
            print(
                f"{mode:14s} {r['tokens_per_s'] / 1e3:8.1f}k tokens/s  MFU {100 * r['mfu']:5.1f}%  "
                f"step {1e3 * r['step_s']:7.1f} ms  peak {r['peak_memory_gib']:6.1f} GiB  "
                f"[ms, synced: {phases}]",
                flush=True,
            )
        else:
            print(f"{mode:14s} failed: {results[-1]['error'][:300]}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": props.name, "args": vars(a), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
