"""Non-finite guards and loss-spike detection (`pretrain.guards`), through the real trainer."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import REPO, tiny_overrides

from pretrain.checkpoint.format import CheckpointReader
from pretrain.config import load_config
from pretrain.diffusion.recipe import Recipe
from pretrain.errors import ConfigError, TrainingError
from pretrain.guards import SpikeDetector
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture
def nan_at_step_3(monkeypatch):
    """The recipe's loss becomes NaN in optimizer step 3 (0-based 2): what an overflow does."""
    real = Recipe.loss

    def loss(self, hidden, head, step):
        value, metrics = real(self, hidden, head, step)
        if step.key.step == 2 and torch.is_grad_enabled():
            value = value * float("nan")
            metrics["loss"] = value.detach()
        return value, metrics

    monkeypatch.setattr(Recipe, "loss", loss)


def _cfg(demo_data, tmp_path, name, **extra):
    values = {"train.steps": 6, "train.log_interval": 1, "train.checkpoint_interval": 2, **extra}
    return load_config(TINY, tiny_overrides(demo_data, tmp_path, name, **values))


def test_nonfinite_loss_stops_before_anything_is_saved(runtime, demo_data, tmp_path, nan_at_step_3):
    with pytest.raises(TrainingError, match=r"step 3: non-finite loss nan; stopped before"):
        train(_cfg(demo_data, tmp_path, "stop"))
    ckpts = tmp_path / "stop" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (ckpts / "step_00000004").exists()
    reader = CheckpointReader(ckpts / "step_00000002")
    assert all(torch.isfinite(reader.full(n)).all() for n in reader.names())


def test_skip_leaves_the_step_out_and_trains_on(
    runtime, demo_data, tmp_path, nan_at_step_3, capsys
):
    result = train(_cfg(demo_data, tmp_path, "skip", **{"train.on_nonfinite": "skip"}))
    assert math.isnan(result.losses[3])
    assert all(math.isfinite(result.losses[s]) for s in (1, 2, 4, 5, 6))
    out = capsys.readouterr().out
    last = next(line for line in out.splitlines() if "step 6/6" in line)
    assert re.search(r"train/skipped_steps=1\b", last), last
    reader = CheckpointReader(result.checkpoint)
    assert all(torch.isfinite(reader.full(n)).all() for n in reader.names())
    assert reader.common["optimizer_step"] == 5  # six steps, one of them changed nothing


def test_skip_needs_the_fused_optimizer():
    with pytest.raises(ConfigError, match="train.on_nonfinite 'skip'"):
        load_config(TINY, ["train.on_nonfinite=skip", "parallel.zero_stage=2"])


def test_spike_detector_flags_outliers_only():
    detector = SpikeDetector(zscore=6.0, window=50)
    steady = {s: 3.0 + 0.01 * math.sin(s) for s in range(1, 41)}
    assert detector.update(steady) == []
    spikes = detector.update({41: 3.5, 42: 3.0})
    assert [step for step, _ in spikes] == [41] and spikes[0][1] > 6
    metrics = detector.metrics()
    assert metrics["train/loss_spikes"] == 1.0 and metrics["train/loss_zscore_max"] > 6
