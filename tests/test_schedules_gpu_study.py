"""experiments/schedules_gpu_study.py at toy size on CPU: calibration, equal-token runs, the
paired measurements, the table and the figures (the GPU run uses the same code at 110M)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO


def test_the_study_runs_end_to_end_at_toy_size(demo_data, tmp_path):
    out = tmp_path / "study"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [
            sys.executable,
            "experiments/schedules_gpu_study.py",
            "--toy",
            "--data",
            str(demo_data),
            "--out",
            str(out),
            "--variants",
            "linear",
            "distance:2",
            "--seeds",
            "0",
            "1",
            "--seeded",
            "linear",
            "--budget-s",
            "3000",
            "--calibration-steps",
            "3",
            "--max-steps",
            "3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[study] calibration" in done.stdout and "-> " in done.stdout
    runs = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in runs] == [
        ("linear", 0),
        ("distance:2", 0),
        ("linear", 1),
    ]
    assert len({r["train_tokens"] for r in runs}) == 1 and runs[0]["steps"] == 3  # equal tokens
    for r in runs:
        low, mid, high = (
            r["masked"]["far_ce"][1],
            r["masked"]["far_ce"][0],
            r["masked"]["far_ce"][2],
        )
        assert math.isfinite(mid) and low <= mid <= high
        assert math.isfinite(r["own_nelbo"]) and math.isfinite(r["masked"]["linear_nelbo"][0])
        assert set(r["generation"]) == {"T1_tps1", "T1_tps4", "T0_tps1", "T0_tps4"}
        stats = r["generation"]["T1_tps4"]
        assert 0 <= stats["unigram_js"] <= math.log(2) and 0 <= stats["bigram_seen"] <= 1
        assert r["probe"]["buckets"] and r["prefix"]["profile"]
    paired = runs[1]["vs_linear"]["far_ce"]
    assert paired[1] <= paired[0] <= paired[2]
    table = (out / "table.md").read_text()
    assert "| distance:2 | 0 | 3 |" in table and "far CE - linear" in table
    for png in ("ce_by_distance.png", "generation.png", "probe.png"):
        assert (out / png).stat().st_size > 5000, png


def test_text_statistics_against_hand_counts():
    import torch

    from pretrain.probe.text_stats import text_stats

    reference = torch.tensor([[1, 2, 3, 4, 1, 2]])
    same = text_stats(reference, reference, eos_id=0)
    assert same["unigram_js"] == 0.0 and same["bigram_seen"] == 1.0
    assert same["immediate_repeat"] == 0.0 and same["eos_share"] == 0.0
    loop = text_stats(torch.tensor([[5, 5, 5, 5, 5, 0]]), reference, eos_id=0)
    assert math.isclose(loop["unigram_js"], math.log(2))  # disjoint supports
    assert loop["bigram_seen"] == 0.0 and loop["immediate_repeat"] == 4 / 5
    assert loop["repetition_4gram"] == 1 - 2 / 3 and math.isclose(loop["eos_share"], 1 / 6)


def test_bootstrap_and_paired_difference():
    import numpy as np

    from experiments.schedules_gpu_eval import FAR, bootstrap, paired_difference

    rng = np.random.default_rng(0)
    values, counts = rng.random(200) * 10, rng.integers(1, 5, 200).astype(float)
    point, low, high = bootstrap(values, counts)
    assert math.isclose(point, values.sum() / counts.sum()) and low < point < high
    a = {
        "lows": [1, FAR],
        "sums": np.stack([values, values], 1),
        "counts": np.stack([counts] * 2, 1),
    }
    b = {**a, "sums": np.stack([values, values - counts * 0.5], 1)}  # 0.5 nats lower per token
    diff = paired_difference(a, b)
    assert all(math.isclose(d, 0.5) for d in diff)  # paired: no spread at all
