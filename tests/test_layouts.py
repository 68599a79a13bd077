"""Every objective and feature under every layout: the same run as one process.

The matrix: each objective (`masked`, `block`, `ar`, `ar_adapt`), plain and with document masks
plus an auxiliary loss (and position-aware schedules with prefix conditioning), under pipeline
parallelism (PP2), tensor x pipeline (TP2 x PP2, 4 processes), data parallelism with ZeRO-1
(DP2; the fused optimizer sharded over DP) and tensor + sequence parallelism (TP2 + SP). Real
torchrun jobs on gloo; each run is compared with one process of the same config and seed whose
micro-batch holds the same global batch (tolerances of tests/test_parallel.py: losses over 6
steps within 1e-5, final parameters within 1e-4). Plus: the fused optimizer equals DeepSpeed's
at DP2 ZeRO-1 and at PP2 (what makes it the default), and a block-diffusion checkpoint written
at TP2 x PP2 resumes in one process as the uninterrupted run continues.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_parallel import (
    HALF,
    TINY,
    assert_losses_close,
    assert_params_close,
    launch,
    losses,
    overrides,
)

from pretrain.config import load_config
from pretrain.trainer import train

AUX_SC = "[{name: self_correction, fill_fraction: 0.5}]"
AUX_NCE = "[{name: energy_nce, weight: 0.5}]"
AUX_MS = "[{name: multistep_consistency, weight: 0.5}]"

# name -> overrides; the `+` variants add document masks and an auxiliary loss (not for `ar`,
# which decodes one token per step: nothing for the losses to make consistent)
VARIANTS: dict[str, dict] = {
    "masked": {},
    "masked+": {
        "data.document_mask": True,
        "diffusion.schedule": "distance",
        "diffusion.prefix_probability": 0.5,
        "auxiliary.losses": AUX_SC,
    },
    "block": {"diffusion.objective": "block", "diffusion.block_length": 8},
    "block+": {
        "diffusion.objective": "block",
        "diffusion.block_length": 8,
        "data.document_mask": True,
        "auxiliary.losses": AUX_NCE,
    },
    "ar": {"diffusion.objective": "ar"},
    "ar+": {"diffusion.objective": "ar", "data.document_mask": True},
    "ar_adapt": {"diffusion.objective": "ar_adapt", "diffusion.anneal_steps": 4},
    "ar_adapt+": {
        "diffusion.objective": "ar_adapt",
        "diffusion.anneal_steps": 4,
        "diffusion.schedule": "block",
        "diffusion.prefix_probability": 0.5,
        "data.document_mask": True,
        "auxiliary.losses": AUX_MS,
    },
}
SP = {"parallel.tensor_parallel": 2, "parallel.sequence_parallel": True}
# layout -> (processes, overrides, single-process micro-batch with the same global batch)
LAYOUTS = {
    "pp2": (2, {"parallel.pipeline_parallel": 2}, 4),
    "tp2xpp2": (4, {"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2}, 4),
    "dp2-zero1": (2, {"parallel.zero_stage": 1}, 8),
    "tp2-sp": (2, SP, 4),
}
DEEPSPEED = {"optim.master_weights": "deepspeed"}


@pytest.fixture(scope="module")
def single(runtime, demo_data, tmp_path_factory):
    """One process per variant, micro-batch 4 and 8."""
    out = tmp_path_factory.mktemp("layouts-single")
    runs = {}
    for name, extra in VARIANTS.items():
        for micro in (4, 8):
            o = overrides(demo_data, out, f"{name}-{micro}", micro=micro, **extra)
            runs[name, micro] = train(load_config(TINY, o))
    for micro in (4, 8):  # DeepSpeed's optimizer, for the fused-vs-DeepSpeed comparison
        o = overrides(demo_data, out, f"ds-{micro}", micro=micro, **DEEPSPEED)
        runs["masked-deepspeed", micro] = train(load_config(TINY, o))
    return runs


@pytest.fixture(scope="module")
def jobs(demo_data, tmp_path_factory):
    """One torchrun job per layout running every variant (plus the extra runs)."""
    results = {}
    for layout, (nproc, extra, _) in LAYOUTS.items():
        work = tmp_path_factory.mktemp(layout)
        runs = [
            {
                "overrides": overrides(demo_data, work, name, **extra, **variant),
                "cpu_sequence_parallel": layout == "tp2-sp",
            }
            for name, variant in VARIANTS.items()
        ]
        names = list(VARIANTS)
        if layout in ("pp2", "dp2-zero1"):
            runs.append({"overrides": overrides(demo_data, work, "ds", **extra, **DEEPSPEED)})
            names.append("masked-deepspeed")
        if layout == "tp2xpp2":
            o = overrides(demo_data, work, "block-resume", **extra, **VARIANTS["block"])
            runs.append({"overrides": o, "stop_at": HALF})
            names.append("block-resume")
        done = launch(nproc, runs, work)
        results[layout] = {"work": work, "runs": dict(zip(names, done, strict=True))}
    return results


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_objective_and_feature_equals_one_process(single, jobs, layout):
    micro = LAYOUTS[layout][2]
    for name in VARIANTS:
        got, want = jobs[layout]["runs"][name], single[name, micro]
        assert_losses_close(losses(got), losses(want))
        assert_params_close(Path(got["checkpoint"]), want.checkpoint)


@pytest.mark.parametrize("layout", ["pp2", "dp2-zero1"])
def test_fused_optimizer_equals_deepspeed_optimizer(single, jobs, layout):
    micro = LAYOUTS[layout][2]
    fused, deepspeed = jobs[layout]["runs"]["masked"], jobs[layout]["runs"]["masked-deepspeed"]
    assert_losses_close(losses(fused), losses(deepspeed))
    assert_params_close(Path(fused["checkpoint"]), Path(deepspeed["checkpoint"]))
    assert_losses_close(losses(deepspeed), losses(single["masked-deepspeed", micro]))


def test_variants_differ_so_the_matrix_compares_something(single):
    """Each feature changes the run (else equality would prove nothing about it)."""
    finals = {name: losses(single[name, 4])[6] for name in VARIANTS}
    assert len(set(finals.values())) == len(finals), finals


def test_block_checkpoint_from_tp2xpp2_resumes_in_one_process(single, jobs, demo_data):
    work = jobs["tp2xpp2"]["work"]
    first = jobs["tp2xpp2"]["runs"]["block-resume"]
    assert sorted(losses(first)) == [1, 2, 3]
    resumed = train(
        load_config(TINY, overrides(demo_data, work, "block-resume", **VARIANTS["block"]))
    )
    want = losses(single["block", 4])
    assert_losses_close(losses(resumed), {s: want[s] for s in (4, 5, 6)})
    assert_params_close(resumed.checkpoint, single["block", 4].checkpoint)
