"""Position-aware schedules and prefix conditioning: the exact check per position for every
NELBO schedule (and its failure for the surrogate), distances, prefixes and SFT loss masks."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import DiffusionConfig
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.objective import MaskedDiffusion, build_objective, context_distance
from pretrain.diffusion.schedules import SCHEDULES, build_schedule

V, L, MASK, EPS = 50, 64, 50, 1e-3
NELBO = sorted(n for n, c in SCHEDULES.items() if c.is_nelbo)


def objective(schedule: str, prefix: float = 0.5) -> MaskedDiffusion:
    cfg = DiffusionConfig(schedule=schedule, prefix_probability=prefix, block_length=16)
    return build_objective(cfg, mask_id=MASK, seq_len=L)


def uniform_predictor_losses(obj, steps: int, x0_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence loss of a uniform predictor, and the number of positions eligible for it."""
    losses, eligible = [], []
    for step in range(steps):
        x0 = x0_fn(step)
        batch = obj.prepare(x0, CorruptionKey(seed=11, step=step))
        prefix = obj._prefix(x0, CorruptionKey(seed=11, step=step))
        losses.append((math.log(V) * batch.loss_weights * batch.masked).sum(1))
        eligible.append((~prefix).sum(1) if prefix is not None else torch.full((128,), L))
    return torch.cat(losses).double(), torch.cat(eligible).double()


@pytest.mark.parametrize("schedule", NELBO)
def test_exact_check_per_position_with_prefix_conditioning(schedule):
    """With a random clean prefix (not a target) and per-position alpha_i, a uniform predictor's
    expected loss is exactly (#positions after the prefix) * log V; the Monte-Carlo mean of
    loss - that must be 0 within 4 standard errors."""
    obj = objective(schedule)
    losses, eligible = uniform_predictor_losses(
        obj,
        200,
        lambda s: torch.randint(0, V, (128, L), generator=torch.Generator().manual_seed(s)),
    )
    diff = losses - eligible * math.log(V)
    stderr = diff.std().item() / math.sqrt(len(diff))
    assert abs(diff.mean().item()) < 4 * stderr, (diff.mean().item(), stderr)
    assert abs(diff.mean().item()) / (eligible.mean().item() * math.log(V)) < 0.02


@pytest.mark.parametrize("schedule", NELBO)
def test_window_normalised_weights_integrate_to_one_at_every_distance(schedule):
    sched = build_schedule(schedule, DiffusionConfig(block_length=16), horizon=L)
    n = 200_000
    t = (EPS + (1 - EPS) * (torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    d = torch.arange(L, dtype=torch.float64)[None]
    alpha = sched.alpha(t, d)
    w = torch.where(alpha < 1, sched.loss_weight(t, EPS, d), 0.0)
    assert w.shape == (n, L)
    per_position = ((1 - alpha) * w).mean(0)
    assert torch.allclose(per_position, torch.ones(L, dtype=torch.float64), atol=2e-3)


def test_surrogate_fails_the_exact_check():
    """The frequency surrogate masks by content and keeps 1/t weights: on text with repeated
    tokens the uniform predictor's loss is far from L log V (it is not a NELBO)."""
    assert not SCHEDULES["frequency"].is_nelbo
    obj = objective("frequency", prefix=0.0)

    # skewed data: token 0 half the time, so in-sequence frequencies differ a lot
    def skewed(s):
        g = torch.Generator().manual_seed(s)
        x = torch.randint(1, V, (128, L), generator=g)
        return torch.where(torch.rand(128, L, generator=g) < 0.5, 0, x)

    losses, eligible = uniform_predictor_losses(obj, 60, skewed)
    diff = losses - eligible * math.log(V)
    stderr = diff.std().item() / math.sqrt(len(diff))
    assert abs(diff.mean().item()) > 10 * stderr
    assert abs(diff.mean().item()) / (L * math.log(V)) > 0.05


def test_distance_schedule_knob_and_order():
    """gamma = 0 is the linear schedule; gamma > 0 masks far positions earlier (smaller alpha)."""
    t = torch.tensor([[0.3]], dtype=torch.float64)
    d = torch.arange(L, dtype=torch.float64)[None]
    flat = build_schedule("distance", DiffusionConfig(distance_strength=0.0), horizon=L)
    lin = build_schedule("linear")
    torch.testing.assert_close(flat.alpha(t, d), lin.alpha(t).expand(1, L))
    torch.testing.assert_close(flat.weight(t, d), lin.weight(t).expand(1, L))
    steep = build_schedule("distance", DiffusionConfig(distance_strength=3.0), horizon=L)
    alpha = steep.alpha(t, d)[0]
    assert (alpha[1:] < alpha[:-1]).all() and alpha[0] > 0.9 and alpha[-1] < 0.3


def test_block_schedule_is_a_staircase_nearest_block_last():
    sched = build_schedule("block", DiffusionConfig(block_length=16), horizon=L)  # 4 blocks
    d = torch.arange(L, dtype=torch.float64)[None]
    a = sched.alpha(torch.tensor([[0.6]], dtype=torch.float64), d)[0]
    # n t = 2.4: blocks 3 and 2 (far) fully masked, block 1 at tau = 0.4, block 0 clean
    assert (a[48:] == 0).all() and (a[32:48] == 0).all()
    assert torch.allclose(a[16:32], torch.full((16,), 0.6, dtype=torch.float64))
    assert (a[:16] == 1).all()


def test_prefix_stays_clean_out_of_loss_and_sets_distances():
    obj = objective("distance", prefix=1.0)
    x0 = torch.randint(0, V, (64, L), generator=torch.Generator().manual_seed(0))
    key = CorruptionKey(seed=3, step=5)
    batch, prefix = obj.prepare(x0, key), obj._prefix(x0, key)
    lengths = prefix.sum(1)
    assert (lengths >= 1).all() and (lengths < L).all() and lengths.unique().numel() > 5
    assert not (batch.masked & prefix).any() and (batch.loss_weights[prefix] == 0).all()
    assert torch.equal(batch.inputs[prefix], x0[prefix])
    dist = context_distance(prefix, x0)
    for row in range(4):
        p = int(lengths[row])
        assert dist[row, p] == 0 and dist[row, p + 5 if p + 5 < L else p] in (0, 5)
    # keyed per global sequence index: two micro-batches of 32 draw the same prefixes as one 64
    halves = [
        obj._prefix(x0[32 * m : 32 * (m + 1)], CorruptionKey(3, 5, micro=m, micro_batches=2))
        for m in range(2)
    ]
    assert torch.equal(torch.cat(halves), prefix)


def test_sft_loss_mask_keeps_prompt_clean_and_measures_from_its_end():
    obj = objective("distance", prefix=0.0)
    x0 = torch.randint(0, V, (8, L), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones(8, L, dtype=torch.bool)
    loss_mask[:, :10] = False  # a 10-token prompt
    batch = obj.prepare(x0, CorruptionKey(seed=0, step=1), loss_mask=loss_mask)
    assert not batch.masked[:, :10].any() and (batch.loss_weights[:, :10] == 0).all()
    assert batch.masked[:, 10:].any()
    d = context_distance(~loss_mask, x0)
    assert torch.equal(d[0, 10:], torch.arange(L - 10, dtype=torch.float64))


def test_default_config_path_is_unchanged():
    """No prefix, no loss mask, a shared schedule: exactly the original per-sequence weights."""
    obj = objective("linear", prefix=0.0)
    batch = obj.prepare(torch.randint(0, V, (16, L)), CorruptionKey(seed=0, step=3))
    torch.testing.assert_close(batch.loss_weights, batch.masked.float() / batch.t[:, None])


def test_all_true_loss_mask_is_the_default_path():
    obj = objective("linear", prefix=0.0)
    x0 = torch.randint(0, V, (16, L), generator=torch.Generator().manual_seed(2))
    key = CorruptionKey(seed=0, step=3)
    a, b = obj.prepare(x0, key), obj.prepare(x0, key, torch.ones(16, L, dtype=torch.bool))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.loss_weights, b.loss_weights)


def test_trainer_passes_the_streams_loss_mask(demo_data, tmp_path, runtime, monkeypatch):
    """LLaDA-style truncation pads rows with EOS (loss_mask False): the trainer hands the mask to
    the objective, and no padding position is ever a target."""
    from conftest import tiny_overrides

    from pretrain.config import load_config
    from pretrain.trainer import train

    seen = []
    original = MaskedDiffusion.prepare

    def spy(self, x0, key, loss_mask=None, x0_host=None):
        batch = original(self, x0, key, loss_mask, x0_host)
        seen.append((loss_mask, batch.masked))
        return batch

    monkeypatch.setattr(MaskedDiffusion, "prepare", spy)
    over = {"train.steps": 3, "data.truncate_fraction": 0.5, "train.checkpoint_interval": 0}
    cfg = load_config("configs/tiny.yaml", tiny_overrides(demo_data, tmp_path, "trunc", **over))
    losses = list(train(cfg).losses.values())
    assert all(math.isfinite(x) for x in losses) and len(seen) == 3
    assert any(not m.all() for m, _ in seen)  # some rows were truncated
    for loss_mask, masked in seen:
        assert not (masked & ~loss_mask).any()


def test_in_sequence_counts_on_the_host_equal_the_pairwise_comparison():
    from pretrain.diffusion.schedules import in_sequence_counts

    x0 = torch.randint(0, 7, (5, 40), generator=torch.Generator().manual_seed(4))
    pairwise = (x0[:, :, None] == x0[:, None, :]).sum(-1)
    assert torch.equal(in_sequence_counts(x0), pairwise)
