"""The benchmark's plain-PyTorch reference computes the same function as our model and objective,
so the GPU benchmark compares like with like (checked here exactly, in fp32 on CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from conftest import free_port

from pretrain.config import DiffusionConfig, ModelConfig
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.objective import build_objective
from pretrain.model.parallelize import build_model

VOCAB, MASK = 300, 299


def _bench_module(name: str):
    path = Path(__file__).parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_equals_our_model_and_loss(runtime):
    ref_lib = _bench_module("reference")
    cfg = ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_attention_heads=8,
        num_query_groups=2,  # grouped-query attention: exercises the fused-QKV group layout
        ffn_hidden_size=96,
        rope_base=500000.0,
    )
    ours = build_model(cfg, vocab_size=VOCAB, mask_token_id=MASK, seed=5)
    ref = ref_lib.build_reference(cfg, vocab=VOCAB, padded_vocab=384, mask_id=MASK)
    ref_lib.load_canonical(ref, dict(ours.named_parameters()))
    objective = build_objective(DiffusionConfig(), mask_id=MASK)
    x0 = torch.randint(0, MASK, (3, 40), generator=torch.Generator().manual_seed(0))
    batch = objective.prepare(x0, CorruptionKey(seed=1, step=0))
    assert 0 < batch.masked.sum() < batch.masked.numel()
    ce = ours(batch.inputs, targets=batch.targets, loss_positions=batch.masked)
    loss_ours = objective.loss(ce, batch)[0]
    loss_ref = ref(batch.inputs, batch.targets, batch.loss_weights)
    torch.testing.assert_close(loss_ref, loss_ours, rtol=1e-5, atol=1e-6)
    loss_ours.backward()
    loss_ref.backward()
    torch.testing.assert_close(
        ref.head.weight.grad, ours.head.output_layer.weight.grad, rtol=1e-4, atol=1e-7
    )
    torch.testing.assert_close(
        ref.blocks[0].fc1.weight.grad,
        ours.layers[0].mlp.linear_fc1.weight.grad,
        rtol=1e-4,
        atol=1e-7,
    )


def test_the_head_benchmark_runs_every_variant_and_they_agree(tmp_path):
    """bench/head_step.py on CPU at toy size (a check of the script, not of speed): one row per
    variant, each variant's gradients equal the recomputing head's within 1e-5."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "head.jsonl"
    root = Path(__file__).parents[1]
    cmd = [
        sys.executable, str(root / "bench" / "head_step.py"), "--config",
        str(root / "configs" / "tiny.yaml"), "--seq", "32", "--micro-batch", "4", "--vocab",
        "500", "--device", "cpu", "--repeats", "2", "--compile", "--out", str(out),
    ]  # fmt: skip
    # a port of its own: this process's runtime (other tests) holds the inherited MASTER_PORT
    env = {**os.environ, "PYTHONPATH": str(root), "MASTER_PORT": str(free_port())}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["recompute", "stored", "compile_head"]
    assert all(r["ms"] > 0 and 0 < r["masked_rows"] < 32 * 4 for r in rows)
    for row in rows:
        assert max(row["grad_rel_diff_vs_recompute"].values()) <= 1e-5, row


def test_gap_causes_blames_the_host_ranges_that_ran_while_the_device_waited():
    profiling = _bench_module("profiling")

    def kernel(ts, corr):
        return {
            "ph": "X",
            "cat": "kernel",
            "name": f"k{corr}",
            "ts": ts,
            "dur": 10,
            "args": {"correlation": corr},
        }

    def launch(ts, corr):
        return {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaLaunchKernel",
            "ts": ts,
            "dur": 2,
            "args": {"correlation": corr},
        }

    def host(name, ts, dur):
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur}

    events = [
        kernel(0, 1), launch(-5, 1),
        kernel(100, 2), launch(90, 2),  # idle 10..100, launched late at 90: the host's fault
        kernel(300, 3), launch(50, 3),  # idle 110..300, launched long before: not the host
        host("optimizer", 0, 60), host("batch", 60, 35), host("outer", 0, 95),
    ]  # fmt: skip
    text = profiling.summarize_gap_causes(events, steps=1, min_us=50, top=5)
    lines = text.splitlines()
    assert "0.08 ms/step of device idle waiting for a late launch in 1.0 gaps" in lines[0]
    assert "0.19 ms/step of gaps whose kernel was already launched" in lines[0]
    ranked = [ln.split() for ln in lines[1:]]
    assert ranked == [["0.08", "outer"], ["0.05", "optimizer"], ["0.03", "batch"]]
