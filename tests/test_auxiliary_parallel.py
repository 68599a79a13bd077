"""Auxiliary losses under tensor parallelism: a TP=2 job (2 real gloo processes) with all three
losses enabled trains exactly like one process.

They exercise the TP-specific paths: logits gathered over the vocab-parallel split before
sampling (every TP rank must draw the same samples from the same seeded uniforms), the
vocab-parallel CE on the sampled draft, the KL through the gathered logits (its gradient split
back to each rank's vocab slice), and the energy weights in the mask token's output-layer row,
which lives on one TP rank only. Tolerances as in test_parallel.py: per-step losses within
1e-5, final parameters (incl. the energy row) within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

from test_parallel import (
    TINY,
    assert_losses_close,
    assert_params_close,
    launch,
    losses,
    overrides,
)

from pretrain.config import load_config
from pretrain.trainer import train

AUX = {
    "auxiliary.losses": (
        "[{name: self_correction}, {name: energy_nce, weight: 0.5},"
        " {name: multistep_consistency, weight: 0.5}]"
    ),
}


def test_tp2_with_auxiliary_losses_matches_single_process(runtime, demo_data, tmp_path):
    single = train(load_config(TINY, overrides(demo_data, tmp_path, "single", **AUX)))
    run = {
        "overrides": overrides(demo_data, tmp_path, "tp2", **AUX, **{"parallel.tensor_parallel": 2})
    }
    (result,) = launch(2, [run], tmp_path / "job")
    assert_losses_close(losses(result), losses(single))
    assert_params_close(Path(result["checkpoint"]), single.checkpoint)
    # the auxiliary losses ran (they change the loss), so the comparison covers them
    plain = train(load_config(TINY, overrides(demo_data, tmp_path, "plain")))
    assert losses(plain)[6] != losses(single)[6]
