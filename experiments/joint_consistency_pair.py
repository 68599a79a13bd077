"""The synthetic pair task of tests/test_joint_consistency.py as a table: agreement of one-step
parallel decoding for a marginal-only model and for each auxiliary loss with its decoder, with
the training cost (seconds and extra forward passes per step) and the decoding cost.

    python experiments/joint_consistency_pair.py [--steps 600] [--samples 1024]
"""

from __future__ import annotations

import argparse
import json

import torch

from pretrain.config import load_config
from pretrain.config.schema import AuxiliaryLossConfig
from pretrain.diffusion.auxiliary.pair_task import PairTask, train_tiny
from pretrain.parallel.runtime import init_runtime
from pretrain.sampling.consistency import CallCounter, energy_resample, remask_generate
from pretrain.sampling.sampler import generate

THRESHOLD = {"baseline": 0.8, "self_correction": 0.8, "multistep_consistency": 0.7}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args()
    init_runtime(load_config(None, ["train.device=cpu"]))
    task = PairTask()
    gen_length = task.length - 1
    rows = []
    for name in ("baseline", "self_correction", "multistep_consistency", "energy_nce"):
        losses = [] if name == "baseline" else [AuxiliaryLossConfig(name=name)]
        run = train_tiny(task, losses, steps=args.steps)

        def decode(decoder, tokens_per_step=gen_length, run=run, name=name, **kw):
            fn = CallCounter(run.view.logits)
            stats: dict = {}
            common = dict(
                gen_length=gen_length,
                tokens_per_step=tokens_per_step,
                mask_id=task.mask_id,
                generator=torch.Generator().manual_seed(1),
            )
            prompt = task.prompt(args.samples)
            if decoder == "plain":
                x = generate(fn, prompt, temperature=1.0, **common)
            elif decoder == "remask":
                x = remask_generate(fn, prompt, threshold=THRESHOLD[name], stats=stats, **common)
            else:
                energy = lambda t: run.view.energy(t, row=task.mask_id)  # noqa: E731
                x = energy_resample(fn, energy, prompt, **kw, **common)
            remasked = float(stats["remasked"].float().mean()) if stats else 0.0
            row = {
                "variant": name,
                "decoder": f"{decoder}{kw.get('k', '')}",
                "tokens_per_step": tokens_per_step,
                "agreement": task.agreement(x),
                "remasked_per_sequence": remasked,
                "sequences_through_model_per_sample": fn.rows / args.samples,
                "train_seconds_per_step": run.seconds_per_step,
                "extra_forwards_per_step": run.extra_forwards_per_step,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

        decode("plain")
        decode("plain", tokens_per_step=1)
        if name == "energy_nce":
            for k in (4, 8, 16):
                decode("energy", k=k)
        else:
            decode("remask")


if __name__ == "__main__":
    main()
