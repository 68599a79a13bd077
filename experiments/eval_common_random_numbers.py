"""How much the shared masks of a question's choices (common random numbers) steady the answers.

    python experiments/eval_common_random_numbers.py CHECKPOINT [--task dlm_agreement_local]
        [--samples 16] [--seeds 5] [--limit 200]

Scores a multiple-choice task's requests under several seeds twice: with `dlm eval`'s masks
(keyed by context and continuation length, so equally long choices share them) and with masks
keyed by the whole request (independent per choice, what a per-request seed alone gives). Prints,
for both, the accuracy of each seed, its spread over seeds, and the share of decisions whose two
choices differ by less than 2 standard errors of their difference.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def independent_plan(scorer, request):
    """The default plan, drawn from a generator keyed by the continuation's tokens too."""
    from pretrain.evaluation.estimator import request_generator

    gen = request_generator(scorer.seed, request.context + (-1,) + request.continuation, 0)
    return scorer.layout.plan(
        len(request.context), len(request.continuation), scorer.samples, gen, greedy_row=False
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--task", default="dlm_agreement_local")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--limit", type=int, default=200)
    args = p.parse_args()

    from pretrain.evaluation.agreement import load_pairs
    from pretrain.evaluation.layouts import build_layout
    from pretrain.evaluation.loading import load_eval_model
    from pretrain.evaluation.scoring import Request, Scorer

    model = load_eval_model(args.checkpoint)
    docs = list(load_pairs(args.task.removeprefix("dlm_agreement_"))["test"])[: args.limit]
    pairs = []
    for d in docs:
        ctx = model.encode(d["prefix"])
        whole = [model.encode(d["prefix"] + " " + d[k]) for k in ("good", "bad")]
        pairs.append([Request(tuple(ctx), tuple(w[len(ctx) :])) for w in whole])
    layout = build_layout(model.diffusion, seq_len=model.seq_len, mask_id=model.mask_id)
    for name in ("shared masks (dlm eval)", "independent masks"):
        accs, close = [], []
        for seed in range(args.seeds):
            scorer = Scorer(
                model.net,
                layout,
                samples=args.samples,
                batch_size=128,
                seed=seed,
                max_length=model.seq_len,
                pad_id=model.eos_id,
                greedy=False,
            )
            if name.startswith("independent"):
                scorer.plan = lambda r, s=scorer: independent_plan(s, r)
            scores = scorer.score([r for pair in pairs for r in pair])
            good, bad = scores[0::2], scores[1::2]
            accs.append(
                sum(g.loglik > b.loglik for g, b in zip(good, bad, strict=True)) / len(docs)
            )
            shared = not name.startswith("independent")
            close.append(
                sum(
                    abs(g.loglik - b.loglik)
                    < 2 * (g.difference_stderr(b) if shared else math.hypot(g.stderr, b.stderr))
                    for g, b in zip(good, bad, strict=True)
                )
                / len(docs)
            )
        same_len = sum(len(a.continuation) == len(b.continuation) for a, b in pairs) / len(pairs)
        print(
            f"{name}: accuracy per seed {[round(a, 3) for a in accs]}, spread (std) "
            f"{statistics.pstdev(accs):.3f}; close decisions {statistics.mean(close):.1%} "
            f"({same_len:.0%} of questions have equally long choices)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
