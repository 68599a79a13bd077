"""The information-decay probe in distributed training: a TP=2 run and a DP=2 run (torchrun
jobs of two gloo processes each) write the probe that one process writes for the same global
batch. TP ranks probe together (vocabulary slices of the logits gathered), only the first
data-parallel replica probes, rank 0 alone writes, and every layout probes the same global
validation data. Tolerance: 1e-4 absolute on entropies, probabilities and CEs (the runs' weights
agree to ~1e-6, tests/test_parallel.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_parallel import STEPS, TINY, launch, overrides

from pretrain.config import load_config
from pretrain.trainer import train

PROBE = {"eval.probe_interval": STEPS, "eval.probe_masks": 16, "eval.probe_prompt_tokens": 8}
ATOL = 1e-4


def probe_file(run_dir: Path) -> dict:
    files = sorted((run_dir / "probe").glob("probe_step_*.json"))
    assert [f.name for f in files] == [f"probe_step_{STEPS:08d}.json"], files
    return json.loads(files[0].read_text())


def assert_probes_close(got: dict, want: dict) -> None:
    for name, values in want["profiles"].items():
        assert len(got["profiles"][name]) == len(values), name
        worst = max(abs(a - b) for a, b in zip(got["profiles"][name], values, strict=True))
        assert worst <= ATOL, f"{name}: {worst:.3g}"
    assert got["summary"].keys() == want["summary"].keys()
    for key, value in want["summary"].items():
        assert got["summary"][key] == pytest.approx(value, abs=ATOL), key
    assert got["distance_bucketed_ce"].keys() == want["distance_bucketed_ce"].keys()
    for label, row in want["distance_bucketed_ce"].items():
        assert got["distance_bucketed_ce"][label]["ce"] == pytest.approx(row["ce"], abs=ATOL)


def test_tp2_and_dp2_probe_as_one_process(runtime, demo_data, tmp_path):
    single = {
        micro: train(
            load_config(TINY, overrides(demo_data, tmp_path, f"one{micro}", micro, **PROBE))
        )
        for micro in (4, 8)
    }
    tp2 = {"parallel.tensor_parallel": 2}
    # one job per layout: a process keeps its parallel layout for life
    (tp2,) = launch(
        2, [{"overrides": overrides(demo_data, tmp_path, "tp2", **PROBE, **tp2)}], tmp_path / "j1"
    )
    (dp2,) = launch(
        2, [{"overrides": overrides(demo_data, tmp_path, "dp2", **PROBE)}], tmp_path / "j2"
    )
    for result, micro in ((tp2, 4), (dp2, 8)):  # DP=2 x 4 has the global batch of 8
        run_dir = Path(result["checkpoint"]).parents[1]
        got, want = probe_file(run_dir), probe_file(single[micro].run_dir)
        assert len(want["profiles"]["entropy"]) == 16 and want["distance_bucketed_ce"]
        assert_probes_close(got, want)
        assert not list((run_dir / "probe").glob("*.tmp*"))
