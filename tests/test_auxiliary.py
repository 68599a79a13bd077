"""Joint-consistency auxiliary losses: config, sampling, the trainer/engine hook, checkpoints.

The losses' effect (agreement on a task with a known joint constraint) is tested in
test_joint_consistency.py; their tensor-parallel equivalence in test_auxiliary_parallel.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, tiny_overrides

from pretrain.config import load_config
from pretrain.config.schema import AuxiliaryLossConfig
from pretrain.diffusion.auxiliary import WEIGHT_SCHEDULES, build_auxiliaries
from pretrain.diffusion.auxiliary.base import sample_categorical
from pretrain.errors import ConfigError
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"
SC_NCE = "[{name: self_correction, fill_fraction: 0.5}, {name: energy_nce, weight: 0.5}]"


def test_unknown_loss_schedule_and_layouts_are_config_errors(tmp_path):
    def build(*extra):
        cfg = load_config(TINY, [f"run.output_dir={tmp_path}", *extra])
        return build_auxiliaries(cfg, mask_id=0, vocab_size=10)

    assert build() is None  # the default: no auxiliary loss, nothing runs
    with pytest.raises(ConfigError, match=r"auxiliary.losses\[0\].name: unknown auxiliary loss"):
        build("auxiliary.losses=[{name: nope}]")
    with pytest.raises(ConfigError, match=r"auxiliary.losses\[0\].schedule: unknown schedule"):
        build("auxiliary.losses=[{name: self_correction, schedule: cosine}]")
    with pytest.raises(ConfigError, match="'ar' decodes one token per step"):
        build("auxiliary.losses=[{name: self_correction}]", "diffusion.objective=ar")
    with pytest.raises(ConfigError, match=r"auxiliary.losses\[0\].fill_fraction"):
        load_config(TINY, ["auxiliary.losses=[{name: self_correction, fill_fraction: 0}]"])
    with pytest.raises(ConfigError, match=r"unknown key 'auxiliary.losses\[0\].wieght'"):
        load_config(TINY, ["auxiliary.losses=[{name: self_correction, wieght: 1}]"])


def test_weight_schedules():
    ramp = AuxiliaryLossConfig(name="x", schedule="linear_ramp", start_step=10, ramp_steps=4)
    got = [WEIGHT_SCHEDULES["linear_ramp"](s, ramp) for s in (0, 9, 10, 11, 13, 100)]
    assert got == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    const = AuxiliaryLossConfig(name="x", start_step=3)
    assert [WEIGHT_SCHEDULES["constant"](s, const) for s in (0, 2, 3, 50)] == [0, 0, 1, 1]


def test_inverse_cdf_sampling_matches_probabilities_and_skips_zero_mass():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])  # zero mass: the mask id, padding
    u = torch.rand(1, 200_000, generator=torch.Generator().manual_seed(0))
    drawn = sample_categorical(probs.expand(1, 200_000, 5), u)[0]
    freq = torch.bincount(drawn, minlength=5).float() / drawn.numel()
    assert freq[1] == 0 and freq[3] == 0
    # 5 sigma of a binomial proportion at n = 2e5 is < 0.006
    torch.testing.assert_close(freq, probs, atol=0.006, rtol=0)
    assert sample_categorical(probs.expand(1, 1, 5), torch.tensor([[0.999999]])).item() == 4


def test_trainer_runs_losses_reports_cost_and_resumes_exactly(runtime, demo_data, tmp_path):
    """Two losses through the real DeepSpeed engine: their metrics and cost are logged, the
    energy weights are trained and checkpointed, and a resumed run equals the uninterrupted one."""
    extra = {
        "train.log_interval": 1,
        "train.checkpoint_interval": 3,
        "train.steps": 6,
        "auxiliary.losses": SC_NCE,
        "auxiliary.eval_tokens_per_step": "[4, 32]",
        "auxiliary.eval_samples": 4,
    }
    full = train(load_config(TINY, tiny_overrides(demo_data, tmp_path, "full", **extra)))
    assert all(math.isfinite(v) for v in full.losses.values())
    ev = full.evals[6]
    for k in (4, 32):
        error, parsed = ev[f"jc/agreement_error_tps{k}"], ev[f"jc/parsed_sentences_tps{k}"]
        # an error rate only over parsed sentences: NaN (not 0) when none parsed
        assert math.isnan(error) if parsed == 0 else 0.0 <= error <= 1.0
        assert 0 <= ev[f"jc/parsed_samples_tps{k}"] <= min(4, parsed)
        assert math.isfinite(ev[f"jc/sample_nelbo_tps{k}"])
    assert ev["jc/sample_nelbo_gap_tps4"] == 0.0  # the reference is the smallest k

    part = tiny_overrides(demo_data, tmp_path, "part", **extra)
    train(load_config(TINY, part), stop_at=3)
    resumed = train(load_config(TINY, part))
    assert resumed.losses == {s: full.losses[s] for s in (4, 5, 6)}  # bit-exact

    from pretrain.checkpoint.format import CheckpointReader

    # The energy weights are the mask token's output-layer row. Its logit is fixed at -inf, so
    # without the energy loss only weight decay (a pure rescaling) would touch it: a change of
    # direction between the two checkpoints shows the NCE gradient reached it.
    mask = json.loads((demo_data / "manifest.json").read_text())["tokenizer"]["mask_id"]
    w3, w6 = (
        CheckpointReader(full.run_dir / "checkpoints" / f"step_{s:08d}").full(
            "head.output_layer.weight"
        )[mask]
        for s in (3, 6)
    )
    assert torch.nn.functional.cosine_similarity(w3, w6, dim=0) < 1 - 1e-4


def test_engine_reports_auxiliary_metrics_and_extra_forwards(runtime, demo_data, tmp_path):
    from pretrain.parallel.engine import host_metrics
    from pretrain.run import build_run

    cfg = load_config(
        TINY,
        tiny_overrides(
            demo_data,
            tmp_path,
            "eng",
            **{"auxiliary.losses": SC_NCE[:-1] + ", {name: multistep_consistency}]"},
        ),
    )
    run = build_run(cfg)
    (batch,) = run.step_batches(0)
    # the gradient calls' rows ride along with the objective's: draft (sc), [x0 ; noise] (nce),
    # one-step draft (ms)
    assert batch.model_inputs().tokens.shape[0] == 5 * cfg.train.micro_batch_size
    local = run.engine.train_step([batch], run.recipe.loss)
    metrics = host_metrics(run.engine.global_metrics(local, run.recipe.train_metric_names))
    # self_correction 2 + energy_nce 3 + multistep_consistency (2 rollout steps) 3
    assert metrics["aux/extra_forwards_per_step"] == 8
    assert metrics["aux/seconds_per_step"] > 0
    assert 0 < metrics["aux/self_correction/filled_fraction"] < 1
    # at init the energy row is N(0, init_std^2): E ~ 0, so the NCE loss is ~ 2 log 2
    assert metrics["aux/energy_nce/loss"] == pytest.approx(2 * math.log(2), abs=0.05)
    assert metrics["aux/multistep_consistency/loss"] > 0
    local = run.engine.eval_step(batch, run.recipe.loss)
    assert set(local) == set(run.recipe.eval_metric_names)
