"""The parallel-decoding gap on a task with several joint constraints, and what closes it.

Task (`experiments.joint_tasks.MULTI_TASK`): <bos> + 15 tokens; three pairs (at distances 1, 8
and 9) and one triple of positions must carry the same symbol (uniform over K = 8 each), the rest
are independent fillers. Per-group marginal agreement of independent draws: (3/8 + 1/64) / 4 =
0.098. A tiny DLM (2 layers, d 64) trains 1200 steps through the real masked-diffusion
objective, with and without an auxiliary loss, and decodes 1024 sequences from <bos>
(temperature 1). Stated bands (binomial std at n = 1024 is <= 0.016):

  * marginal-only model, all 15 tokens in one call: group agreement within [0.5, 1.5] x the
    marginal rate; one token per call: agreement >= 0.9 (the model knows the joint: the gap is
    the parallel decoding's).
  * self_correction + `remask_decode` (one parallel call, 8 loop steps re-masking the lowest-
    scoring token each, 10 calls in all): agreement >= 0.85 and validity (every group right)
    >= 0.6, each at least 0.15 / 0.3 above the marginal-only model with the same decoder;
    the token model's own sequential validity within 0.1 of the marginal-only model's.
  * energy_nce at weight 0.1 + 16-candidate energy resampling: agreement at least 0.1 above
    one-step decoding and above the marginal-only model's resampling (its energy row is
    untrained); sequential validity within 0.05 of the marginal-only model's (at weight 1 it
    fell from 0.99 to 0.35: docs/joint_consistency.md).
Measured (seed 0): experiments/joint_consistency_tasks.py, in docs/joint_consistency.md.
"""

from __future__ import annotations

import pytest
import torch

from experiments.joint_tasks import MULTI_TASK, train_tiny
from pretrain.config.schema import AuxiliaryLossConfig
from pretrain.sampling.consistency import energy_resample, remask_decode
from pretrain.sampling.sampler import generate

TASK = MULTI_TASK
N, STEPS, GEN = 1024, 1200, TASK.length - 1


def _generator():
    return torch.Generator().manual_seed(1)


def decode(run, tokens_per_step: int) -> torch.Tensor:
    return generate(
        run.view.logits,
        TASK.prompt(N),
        gen_length=GEN,
        tokens_per_step=tokens_per_step,
        mask_id=TASK.mask_id,
        temperature=1.0,
        generator=_generator(),
    )


def remask(run) -> torch.Tensor:
    masks = torch.full((N, GEN), TASK.mask_id)
    stats: dict = {}
    x = remask_decode(
        run.view.logits,
        torch.cat([TASK.prompt(N), masks], dim=1),
        mask_id=TASK.mask_id,
        tokens_per_step=GEN,
        loop_steps=8,
        remask_per_step=1,
        generator=_generator(),
        stats=stats,
    )
    assert stats["calls"] == 1 + 8 + 1 and (stats["remasked"] == 8).all()
    assert torch.equal(x[:, 0], TASK.prompt(N)[:, 0])  # the prompt is never re-masked
    return x


def resample(run) -> torch.Tensor:
    return energy_resample(
        run.view.logits,
        lambda tokens: run.view.energy(tokens, row=TASK.mask_id),
        TASK.prompt(N),
        k=16,
        gen_length=GEN,
        tokens_per_step=GEN,
        mask_id=TASK.mask_id,
        generator=_generator(),
    )


@pytest.fixture(scope="module")
def baseline(runtime):
    run = train_tiny(TASK, [], steps=STEPS)
    assert run.extra_forwards_per_step == 0
    return {
        "one_step": TASK.agreement(decode(run, GEN)),
        "sequential": decode(run, 1),
        "remask": remask(run),
        "resample": TASK.agreement(resample(run)),
    }


def test_marginal_model_decoding_in_one_step_sits_at_the_marginal_rate(baseline):
    assert 0.5 * TASK.marginal_rate <= baseline["one_step"] <= 1.5 * TASK.marginal_rate
    assert TASK.agreement(baseline["sequential"]) >= 0.9


def test_self_correction_with_budgeted_remasking_closes_the_gap(runtime, baseline):
    run = train_tiny(TASK, [AuxiliaryLossConfig(name="self_correction")], steps=STEPS)
    assert run.extra_forwards_per_step == 2
    assert TASK.agreement(decode(run, GEN)) <= 1.5 * TASK.marginal_rate  # no help by itself
    x = remask(run)
    agreement, validity = TASK.agreement(x), TASK.validity(x)
    plain = baseline["remask"]
    assert agreement >= 0.85 and agreement >= TASK.agreement(plain) + 0.15, agreement
    assert validity >= 0.6 and validity >= TASK.validity(plain) + 0.3, validity
    sequential = TASK.validity(decode(run, 1))
    assert sequential >= TASK.validity(baseline["sequential"]) - 0.1, sequential


def test_energy_resampling_at_a_small_weight_helps_without_hurting_the_token_model(
    runtime, baseline
):
    run = train_tiny(TASK, [AuxiliaryLossConfig(name="energy_nce", weight=0.1)], steps=STEPS)
    assert run.extra_forwards_per_step == 3
    one_step = TASK.agreement(decode(run, GEN))
    agreement = TASK.agreement(resample(run))
    assert agreement >= one_step + 0.1 and agreement >= baseline["resample"] + 0.1, agreement
    sequential = TASK.validity(decode(run, 1))
    assert sequential >= TASK.validity(baseline["sequential"]) - 0.05, sequential
