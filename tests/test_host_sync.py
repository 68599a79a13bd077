"""What keeps the training step free of host syncs, checked where it can be on a CPU: the host
knows the masked count it hands the model, and metrics stay tensors until the window resolves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from pretrain.config import DiffusionConfig
from pretrain.diffusion.corruption import CorruptionKey, mask_tokens
from pretrain.diffusion.objective import build_objective
from pretrain.parallel.engine import host_metrics
from pretrain.tracking.window import MetricWindow

V, L, MASK = 50, 32, 50


def test_mask_tokens_counts_the_masks_it_draws_on_the_host():
    x0 = torch.randint(0, V, (6, L), generator=torch.Generator().manual_seed(0))
    gens = CorruptionKey(0, 1).row_generators(6, "mask")
    alpha = torch.linspace(0.1, 0.9, 6)[:, None]
    maskable = torch.arange(L)[None].expand(6, L) >= 5
    x_t, masked, count = mask_tokens(x0, alpha, MASK, gens, maskable)
    assert count == int(masked.sum()) and 0 < count < 6 * L
    assert not masked[:, :5].any() and torch.equal(x_t == MASK, masked)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the default path: a shared schedule
        {"schedule": "distance"},  # position-aware
        {"prefix_probability": 0.5},  # prefix conditioning
        {"objective": "block", "block_length": 8},
    ],
    ids=["masked", "distance", "prefix", "block"],
)
def test_every_objective_batch_knows_its_masked_count(overrides):
    obj = build_objective(DiffusionConfig(**overrides), mask_id=MASK, seq_len=L)
    x0 = torch.randint(0, V, (8, L), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones(8, L, dtype=torch.bool)
    loss_mask[0, :7] = False  # an SFT prompt: never masked, never counted
    for mask in (None, loss_mask):
        batch = obj.prepare(x0, CorruptionKey(0, 2), mask)
        assert batch.num_masked == int(batch.masked.sum()) > 0
        if mask is not None:
            assert not batch.masked[0, :7].any()
    eval_batch = obj.prepare_eval(x0, CorruptionKey(0, 0))
    assert eval_batch.num_masked == int(eval_batch.masked.sum())


def test_host_metrics_reads_tensors_and_floats():
    metrics = {"loss": torch.tensor(2.5), "n": 3.0, "frac": torch.tensor(0.25, dtype=torch.float64)}
    assert host_metrics(metrics) == {"loss": 2.5, "n": 3.0, "frac": 0.25}
    assert list(host_metrics(metrics)) == ["loss", "n", "frac"]  # order kept


def test_metric_window_resolves_only_when_asked_and_averages_the_window():
    window = MetricWindow()
    start = time.perf_counter()
    assert (
        window.add(
            1, {"loss": torch.tensor(4.0), "x": torch.tensor(1.0)}, started=start, resolve=False
        )
        == {}
    )
    with pytest.raises(RuntimeError, match="resolve"):
        window.means()  # step 1 is still pending
    losses = window.add(
        2,
        {"loss": torch.tensor(2.0), "x": torch.tensor(3.0)},
        started=time.perf_counter(),
        resolve=True,
    )
    assert losses == {1: 4.0, 2: 2.0}
    means = window.means()
    assert means["loss"] == 3.0 and means["x"] == 2.0
    assert 0 < means["step_time_s"] < time.perf_counter() - start
    losses = window.add(3, {"loss": torch.tensor(1.0)}, started=time.perf_counter(), resolve=True)
    assert losses == {3: 1.0} and window.means()["loss"] == 1.0  # reset after means()


@pytest.mark.parametrize(
    "overrides",
    [
        {"schedule": "distance"},
        {"schedule": "frequency"},
        {"prefix_probability": 0.5},
        {"objective": "ar_adapt", "anneal_steps": 4},
    ],
    ids=["distance", "frequency", "prefix", "ar_adapt"],
)
def test_per_position_corruption_runs_on_the_host_copy(overrides):
    """Given the host copy of x0, position-aware corruption never reads the device tensor: with
    x0 on the `meta` device (no data at all) it still decides and counts the same masks as a
    run entirely on the CPU."""
    obj = build_objective(DiffusionConfig(**overrides), mask_id=MASK, seq_len=L)
    x0 = torch.randint(0, V, (8, L), generator=torch.Generator().manual_seed(2))
    loss_mask = torch.ones(8, L, dtype=torch.bool)
    loss_mask[1, :9] = False
    key = CorruptionKey(0, 3)
    on_cpu = obj.prepare(x0, key, loss_mask)
    on_meta = obj.prepare(x0.to("meta"), key, loss_mask, x0_host=x0)
    assert on_meta.masked.device.type == "meta" and on_meta.loss_weights.device.type == "meta"
    assert on_meta.num_masked == on_cpu.num_masked == int(on_cpu.masked.sum()) > 0


@pytest.mark.parametrize("master_weights", ["deepspeed", "fused"])
def test_the_engine_step_never_synchronises_the_device(
    runtime, demo_data, tmp_path, monkeypatch, master_weights
):
    """DeepSpeed's throughput timer synchronises the accelerator at every forward and step
    unless disabled; our config disables it (on a GPU each sync drains the device's queue)."""
    from conftest import tiny_overrides
    from deepspeed.accelerator import get_accelerator

    from pretrain.config import load_config
    from pretrain.run import build_run

    accelerator = get_accelerator()
    calls = []
    real = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize", lambda *a: calls.append(a) or real(*a))
    overrides = tiny_overrides(demo_data, tmp_path, master_weights)
    tiny = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    cfg = load_config(tiny, [*overrides, f"optim.master_weights={master_weights}"])
    run = build_run(cfg)
    try:
        for step in range(4):  # DeepSpeed's timer starts synchronising at its second step
            run.engine.train_step(run.step_batches(step), run.recipe.loss)
    finally:
        run.close()
    assert calls == []
