"""The parallel-decoding gap on tasks with known joint constraints, and what closes it, as a
table (docs/joint_consistency.md, tests/test_joint_consistency.py).

    python experiments/joint_consistency_tasks.py [--task multi|pair] [--steps 1200]
        [--samples 1024] [--seed 0] [--out runs/jc_tasks.json]

Each variant (marginal-only baseline, self_correction, multistep_consistency, energy_nce at
weight 1 and 0.1) trains a 2-layer, d 64 DLM through the masked-diffusion NELBO for the same
steps and batches, then decodes `samples` sequences from `<bos>` (temperature 1):

    one_step     all tokens in one parallel call (the gap: near the marginal rate)
    sequential   one token per call (the token model's own joint accuracy)
    remask       `remask_decode`: one parallel call, then LOOP steps re-masking the R
                 lowest-scoring committed tokens per step (visible score); its cost is
                 1 + LOOP + 1 calls
    remask_masked  the same with the leave-one-out score (one extra batch per step)
    energy16     16 one-step candidates, energy resampling (energy_nce only)

Columns: mean group agreement, the share of sequences with every group right (validity), model
calls per sample and rows through the model per sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.joint_tasks import MULTI_TASK, PAIR_TASK, train_tiny  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.config.schema import AuxiliaryLossConfig  # noqa: E402
from pretrain.sampling.consistency import CallCounter, energy_resample, remask_decode  # noqa: E402
from pretrain.sampling.sampler import generate  # noqa: E402

VARIANTS = {
    "baseline": [],
    "self_correction": [AuxiliaryLossConfig(name="self_correction")],
    "multistep_consistency": [AuxiliaryLossConfig(name="multistep_consistency")],
    "energy_nce": [AuxiliaryLossConfig(name="energy_nce")],
    "energy_nce_w0.1": [AuxiliaryLossConfig(name="energy_nce", weight=0.1)],
}
DECODERS = {  # name -> (loop steps, re-masked per step, score)
    "remask_l4_r1": (4, 1, "visible"),
    "remask_l8_r1": (8, 1, "visible"),
    "remask_l8_r2": (8, 2, "visible"),
    "remask_masked_l8_r1": (8, 1, "masked"),
}


def evaluate(task, run, samples: int, seed: int, energy: bool) -> list[dict]:
    gen = task.length - 1
    rows = []

    def record(decoder, x, fn, remasked=0.0):
        rows.append(
            {
                "decoder": decoder,
                "agreement": task.agreement(x),
                "validity": task.validity(x),
                "calls": fn.calls,
                "rows_per_sample": fn.rows / samples,
                "remasked_per_sequence": remasked,
            }
        )

    def generator():
        return torch.Generator().manual_seed(seed + 1)

    for decoder, k in (("one_step", gen), ("sequential", 1)):
        fn = CallCounter(run.view.logits)
        x = generate(
            fn,
            task.prompt(samples),
            gen_length=gen,
            tokens_per_step=k,
            mask_id=task.mask_id,
            temperature=1.0,
            generator=generator(),
        )
        record(decoder, x, fn)
    masks = torch.full((samples, gen), task.mask_id)
    for decoder, (loops, per_step, score) in DECODERS.items():
        fn, stats = CallCounter(run.view.logits), {}
        x = remask_decode(
            fn,
            torch.cat([task.prompt(samples), masks], dim=1),
            mask_id=task.mask_id,
            tokens_per_step=gen,
            loop_steps=loops,
            remask_per_step=per_step,
            score=score,
            generator=generator(),
            stats=stats,
        )
        record(decoder, x, fn, float(stats["remasked"].float().mean()))
    if energy:
        fn = CallCounter(run.view.logits)
        x = energy_resample(
            fn,
            lambda t: run.view.energy(t, row=task.mask_id),
            task.prompt(samples),
            k=16,
            gen_length=gen,
            tokens_per_step=gen,
            mask_id=task.mask_id,
            generator=generator(),
        )
        record("energy16", x, fn)
    return rows


def table(results: list[dict], task) -> str:
    lines = [
        f"marginal rate {task.marginal_rate:.3f}",
        "| training | decoder | agreement | validity | calls | rows / sample | re-masked / seq |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['decoder']} | {r['agreement']:.3f} | {r['validity']:.3f} | "
            f"{r['calls']} | {r['rows_per_sample']:.0f} | {r['remasked_per_sequence']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    from pretrain.parallel.runtime import init_runtime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["multi", "pair"], default="multi")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args()
    init_runtime(load_config(None, ["train.device=cpu"]))
    task = MULTI_TASK if args.task == "multi" else PAIR_TASK
    results = []
    for name in args.variants:
        run = train_tiny(task, VARIANTS[name], steps=args.steps, seed=args.seed)
        for row in evaluate(task, run, args.samples, args.seed, name.startswith("energy")):
            row = {"variant": name, "train_seconds_per_step": run.seconds_per_step, **row}
            results.append(row)
            print(json.dumps(row), flush=True)
    print(table(results, task))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
