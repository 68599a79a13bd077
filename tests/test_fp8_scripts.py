"""The FP8 benchmark modes (bench/train_step.py) and the convergence script
(experiments/fp8_convergence.py), run on CPU at toy size with emulated FP8: they check the
scripts, not GPU speed or convergence."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from pretrain.model.fp8 import EMULATE_ENV, Fp8LinearMixin

pytest.importorskip("torchao.float8")

TOY = ["model.hidden_size=64", "model.num_layers=2", "model.ffn_hidden_size=128"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import train_step

    return train_step


def bench_args(demo_data, **extra) -> argparse.Namespace:
    values = dict(
        config=str(REPO / "configs" / "tiny.yaml"),
        data=str(demo_data),
        seq=32,
        micro_batch=4,
        warmup=1,
        steps=2,
        set=[*TOY, "model.compile=false"],
        device="cpu",
        profile=False,
        sync_debug=False,
        sync_trace=False,
        gap_causes=False,
    )
    return argparse.Namespace(**{**values, **extra})


def test_bench_fp8_mode_reports_the_share_of_flops_in_fp8(runtime, bench, demo_data, monkeypatch):
    """`ours+fp8`: FP8 share = 6 x (every converted linear's weights, the head's at the masked
    fraction) / FLOPs per token; MFU on the bf16 peak like every other mode."""
    monkeypatch.setenv(EMULATE_ENV, "1")
    import pretrain.run

    built = {}
    real_build = pretrain.run.build_run

    def build_run(cfg, **kwargs):  # keep the engine to count its FP8 linears
        built["run"] = real_build(cfg, **kwargs)
        return built["run"]

    monkeypatch.setattr(pretrain.run, "build_run", build_run)
    a = bench_args(demo_data, gap_causes=True)  # DeepSpeed's calls labelled: the step still runs
    result = bench.RUNNERS["ours+fp8"](a)
    module = built["run"].engine.ds.module
    fp8 = [m for m in module.modules() if isinstance(m, Fp8LinearMixin)]
    head = module.head.output_layer
    layers = sum(m.weight.numel() for m in fp8)
    want = 6 * layers  # model.fp8_output_layer is off by default: the head's FLOPs are bf16
    assert result["fp8"] == "tensorwise" and len(fp8) == 4 * 2 and head not in fp8
    assert result["fp8_flop_share"] == pytest.approx(want / result["flops_per_token"], rel=1e-9)
    assert 0.5 < result["fp8_flop_share"] < 1.0
    line = bench.row("ours+fp8", result)
    assert f"| {100 * result['fp8_flop_share']:.0f}% |" in line
    assert result["mfu"] == result["tokens_per_s"] * result["flops_per_token"] / bench.PEAK_FLOPS
    check = bench.RUNNERS["check+fp8"](a)  # FP8 loss against the fp32 reference
    assert 0 < check["rel_diff"] < 1e-2


def test_bench_reference_fp8_mode_swaps_every_linear(runtime, bench, demo_data, monkeypatch):
    """`reference+fp8`: the plain step with torchao's Float8Linear on every linear; the FP8
    share is everything but attention."""
    from torchao.float8.float8_linear import Float8Linear

    monkeypatch.setenv(EMULATE_ENV, "1")
    import reference

    built = {}
    real_build = reference.build_reference

    def build_reference(*args, **kwargs):
        built["model"] = real_build(*args, **kwargs)
        return built["model"]

    monkeypatch.setattr(reference, "build_reference", build_reference)
    a = bench_args(demo_data)
    result = bench.RUNNERS["reference+fp8"](a)
    linears = [m for m in built["model"].modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Float8Linear) for m in linears)
    assert result["fp8"] == "tensorwise" and result["tokens_per_s"] > 0
    assert 0.5 < result["fp8_flop_share"] < 1.0
    assert result["fp8_flop_share"] == pytest.approx(
        1 - 12 * 2 * a.seq * 64 / result["flops_per_token"], rel=1e-9
    )  # 12 L s d of attention, L = 2, d = 64 (TOY)


def test_convergence_script_at_toy_size(demo_data, tmp_path):
    out = tmp_path / "conv"
    cmd = [
        sys.executable, str(REPO / "experiments" / "fp8_convergence.py"), "--data", str(demo_data),
        "--out", str(out), "--preset", "toy", "--device", "cpu", "--emulate-fp8", "--steps", "6",
        "--tokens-per-step", "128", "--evals", "2", "--eval-batches", "1", "--concurrent",
        "--seed-spread",
    ]  # fmt: skip
    # not this process's torch.distributed rendezvous (the `runtime` fixture's port is taken)
    dist = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    curves = json.loads((out / "curves.json").read_text())
    assert sorted(curves) == ["fp32", "fp32-other-seed", "fp8-tensorwise"]
    assert curves["fp32-other-seed"]["seed"] == curves["fp32"]["seed"] + 1
    assert curves["fp32-other-seed"]["losses"] != curves["fp32"]["losses"]  # another seed
    spread = summary["seed_spread"]
    final = summary["final_val_nelbo"]
    want = abs(final["fp32-other-seed"] - final["fp32"]) / final["fp32"]
    assert spread["final_val_nelbo_rel_diff"] == pytest.approx(want)
    assert all(sorted(map(int, c["losses"])) == list(range(1, 7)) for c in curves.values())
    assert curves["fp8-tensorwise"]["fp8"] == "tensorwise" and curves["fp32"]["fp8"] == "off"
    assert curves["fp8-tensorwise"]["losses"] != curves["fp32"]["losses"]  # FP8 really on
    final = summary["final_val_nelbo"]
    rel = abs(final["fp8-tensorwise"] - final["fp32"]) / final["fp32"]
    assert summary["final_val_nelbo_rel_diff"] == pytest.approx(rel)
    assert 0 < rel < 0.05  # six steps of a toy model: a check of the script, not of FP8
    assert summary["concurrent"] is True
    assert summary["tokens_per_run"] == 6 * 4 * 32  # 128 tokens per step = 4 sequences of 32
    assert (out / "fp8_convergence.png").stat().st_size > 10_000
