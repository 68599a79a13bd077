"""Masked-diffusion maths: the exact check of docs/design.md §3, antithetic time sampling, and
that the loss only ever counts masked positions."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import DiffusionConfig
from pretrain.diffusion.corruption import CorruptionKey, sample_times
from pretrain.diffusion.objective import MaskedDiffusion, build_objective
from pretrain.diffusion.schedules import SCHEDULES, build_schedule
from pretrain.errors import ConfigError

V, L, MASK = 50, 64, 50  # 50 real tokens, the mask token is id 50
# the exact check holds for NELBO schedules only; the surrogate's failure is in test_schedules.py
NELBO_SCHEDULES = sorted(n for n, cls in SCHEDULES.items() if cls.is_nelbo)


def objective(schedule: str, normalization: str = "token_slot", antithetic: bool = True):
    return MaskedDiffusion(
        build_schedule(schedule),
        mask_id=MASK,
        eps=1e-3,
        antithetic=antithetic,
        normalization=normalization,
    )


@pytest.mark.parametrize("schedule", NELBO_SCHEDULES)
def test_uniform_predictor_loss_converges_to_L_log_V(schedule):
    """A model predicting uniformly over V tokens has CE = log V at every masked position, so the
    expected per-sequence loss is exactly L * log V; the Monte-Carlo mean must agree within 4
    standard errors (the 1/t weights make the estimator heavy-tailed, hence many samples)."""
    obj = objective(schedule)
    per_sequence = []
    for step in range(300):
        x0 = torch.randint(0, V, (128, L))
        batch = obj.prepare(x0, CorruptionKey(seed=7, step=step))
        ce = torch.full((128, L), math.log(V))
        per_sequence.append((ce * batch.loss_weights * batch.masked).sum(dim=1))
    samples = torch.cat(per_sequence).double()
    mean, stderr = samples.mean().item(), samples.std().item() / math.sqrt(len(samples))
    exact = L * math.log(V)
    assert abs(mean - exact) < 4 * stderr, (mean, exact, stderr)
    assert abs(mean - exact) / exact < 0.02


@pytest.mark.parametrize("schedule", NELBO_SCHEDULES)
def test_window_normalised_weights_integrate_to_one(schedule):
    """Deterministic version of the check: E_q[1[masked]] = 1 - alpha(t), so the expected weight
    of one position is the integral of (1 - alpha) Z w over t ~ U(eps, 1), which must be 1."""
    sched, eps = build_schedule(schedule), 1e-3
    n = 2_000_000
    t = eps + (1 - eps) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    integrand = (1 - sched.alpha(t)) * sched.window_normalizer(eps) * sched.weight(t)
    assert integrand.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_linear_schedule_is_llada_weighting():
    obj = objective("linear")
    assert obj.z == 1.0
    batch = obj.prepare(torch.randint(0, V, (16, L)), CorruptionKey(seed=0, step=3))
    expected = batch.masked.float() / batch.t[:, None]
    torch.testing.assert_close(batch.loss_weights, expected)


def test_antithetic_times_stratify_the_global_batch():
    """Across micro-batches and replicas of one step, exactly one t falls in each of the G
    equal-width strata of [eps, 1]; independent sampling does not achieve that."""
    micro, replicas, b, eps = 3, 2, 4, 1e-3
    total = micro * replicas * b
    times = torch.cat(
        [
            sample_times(b, CorruptionKey(1, 5, m, r, micro, replicas), eps=eps, antithetic=True)
            for m in range(micro)
            for r in range(replicas)
        ]
    )
    strata = ((times.double() - eps) / (1 - eps) * total).floor().long()
    assert sorted(strata.tolist()) == list(range(total))
    assert times.min() >= eps and times.max() <= 1.0
    # A different step shifts the grid; independent sampling leaves strata empty.
    other = sample_times(b, CorruptionKey(1, 6, 0, 0, micro, replicas), eps=eps, antithetic=True)
    assert not torch.equal(other, times[:b])
    iid = torch.cat(
        [sample_times(total, CorruptionKey(1, s), eps=eps, antithetic=False) for s in range(50)]
    ).view(50, total)
    iid_strata = ((iid.double() - eps) / (1 - eps) * total).floor().long()
    assert any(len(set(row.tolist())) < total for row in iid_strata)


def test_corruption_is_keyed_by_replica_not_by_rank():
    obj = objective("linear")
    x0 = torch.randint(0, V, (8, L))
    a = obj.prepare(x0, CorruptionKey(3, 10, 1, 0, 2, 2))
    b = obj.prepare(x0, CorruptionKey(3, 10, 1, 0, 2, 2))
    c = obj.prepare(x0, CorruptionKey(3, 10, 1, 1, 2, 2))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.t, b.t)
    assert not torch.equal(a.inputs, c.inputs)


def test_masking_rate_follows_alpha():
    obj = objective("cosine")
    x0 = torch.randint(0, V, (4096, L))
    batch = obj.prepare(x0, CorruptionKey(seed=0, step=0))
    expected = 1 - obj.schedule.alpha(batch.t)
    observed = batch.masked.float().mean(dim=1)
    # Per-sequence mean over 64 Bernoullis: check the average deviation, not each one.
    assert (observed - expected).mean().abs() < 0.01
    assert torch.equal(batch.inputs[batch.masked], torch.full_like(x0[batch.masked], MASK))
    assert torch.equal(batch.inputs[~batch.masked], x0[~batch.masked])


@pytest.mark.parametrize("normalization", ["token_slot", "masked_token"])
def test_loss_never_counts_unmasked_positions(normalization):
    obj = objective("linear", normalization)
    x0 = torch.randint(0, V, (8, L))
    batch = obj.prepare(x0, CorruptionKey(seed=0, step=1))
    assert batch.masked.any() and (~batch.masked).any()
    ce = torch.rand(8, L, requires_grad=True)
    loss, _ = obj.loss(ce, batch)
    loss.backward()
    assert torch.all(ce.grad[~batch.masked] == 0)
    assert torch.all(ce.grad[batch.masked] > 0)
    # Garbage (even inf/nan) at visible positions cannot change the loss.
    poisoned = ce.detach().clone()
    poisoned[~batch.masked] = float("nan")
    poisoned_loss, _ = obj.loss(poisoned, batch)
    assert torch.equal(poisoned_loss, loss.detach())


def test_normalisations_are_explicit():
    x0 = torch.randint(0, V, (8, L))
    key = CorruptionKey(seed=0, step=2)
    ce = torch.rand(8, L)
    slot = objective("linear", "token_slot")
    per_masked = objective("linear", "masked_token")
    batch = slot.prepare(x0, key)
    weighted = (ce * batch.loss_weights * batch.masked).sum()
    loss_slot, metrics_slot = slot.loss(ce, batch)
    loss_masked, metrics_masked = per_masked.loss(ce, batch)
    assert loss_slot.item() == pytest.approx(weighted.item() / (8 * L), rel=1e-6)
    assert loss_masked.item() == pytest.approx(
        weighted.item() / batch.masked.sum().item(), rel=1e-6
    )
    assert "nelbo_per_token_slot" in metrics_slot
    assert "weighted_ce_per_masked_token" in metrics_masked


def test_eval_corruption_is_fixed_and_covers_the_t_grid():
    obj = objective("linear")
    x0 = torch.randint(0, V, (4, L))
    keys = [CorruptionKey(0, 0, i, 0, 3, 1) for i in range(3)]
    first = [obj.prepare_eval(x0, k) for k in keys]
    again = [obj.prepare_eval(x0, k) for k in keys]
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(first, again, strict=True))
    t = torch.cat([b.t for b in first]).double()
    expected = 1e-3 + (1 - 1e-3) * (torch.arange(12, dtype=torch.float64) + 0.5) / 12
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)


def test_unknown_schedule_and_objective_are_config_errors():
    with pytest.raises(ConfigError, match=r"diffusion\.schedule: unknown schedule 'foo'"):
        build_schedule("foo")
    with pytest.raises(ConfigError, match=r"diffusion\.objective: unknown objective 'bar'"):
        build_objective(DiffusionConfig(objective="bar"), mask_id=0)
