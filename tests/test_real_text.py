"""Training on real English text (tinyshakespeare, tests/data/)."""

from __future__ import annotations

import math

from conftest import REPO, SHAKESPEARE, tiny_overrides

from pretrain.config import load_config
from pretrain.trainer import train


def test_trains_on_tinyshakespeare(runtime, tmp_path):
    from data_pipeline.build import build_dataset

    manifest = build_dataset(
        [SHAKESPEARE],
        tmp_path / "shakespeare",
        seq_len=32,
        vocab_size=512,
        samples_per_shard=2048,
        val_fraction=0.02,
        seed=0,
        log=lambda *a: None,
    )
    assert manifest.num_samples("train") > 5000
    overrides = tiny_overrides(
        tmp_path / "shakespeare",
        tmp_path,
        "shakespeare",
        **{
            "train.steps": 200,
            "train.micro_batch_size": 16,
            "train.eval_interval": 100,
            "train.eval_batches": 8,
            "train.log_interval": 50,
            "optim.warmup_steps": 20,
        },
    )
    result = train(load_config(REPO / "configs" / "tiny.yaml", overrides))
    losses = [result.losses[s] for s in sorted(result.losses)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20  # first vs last 10% of steps
    assert last < first - 0.5, (first, last)
    # Held-out text: clearly better than a uniform predictor over the real vocabulary (the mask
    # is never predicted). 200 tiny steps reach roughly unigram level on this corpus; learning
    # from context is what the demo grammar run shows (see README).
    uniform = math.log(manifest.tokenizer.vocab_size - 1)
    final = result.evals[200]
    assert final["val/ce_masked"] < uniform - 0.8, (final, uniform)
    assert final["val/nelbo_per_token_slot"] < uniform - 0.3, (final, uniform)
