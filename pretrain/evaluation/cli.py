"""`dlm eval CHECKPOINT_OR_EXPORT --tasks T1,T2 ...`: lm-evaluation-harness tasks on our model.

Prints the harness's results table and our estimator summary (Monte-Carlo standard errors and
requests/s) and writes the harness's results JSON, with a `dlm` section, to `--output`. Under
`torchrun` every process scores a share of the requests; rank 0 prints and writes.
Argument parsing imports nothing heavy (`dlm --help` builds every parser).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _limit(text: str) -> int | float:
    """The harness's --limit: a document count, or a fraction of each task below 1."""
    value = float(text)
    return value if value < 1 else int(value)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="checkpoint directory, run directory (its latest) or exported directory"
    )
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of extra task YAML files (repeatable); the project's own are included",
    )
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples")
    parser.add_argument(
        "--limit", type=_limit, default=None, help="documents per task (or a fraction < 1)"
    )
    parser.add_argument(
        "--mc-samples", type=int, default=128, help="Monte-Carlo samples per likelihood request"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=1234, help="seed of masks and few-shot draws")
    parser.add_argument("--output", metavar="FILE", help="write the results JSON here")
    parser.add_argument("--data", metavar="DIR", help="dataset directory with the tokenizer")
    parser.add_argument("--device", default=None, help="default: this process's GPU, else CPU")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=None, help="generation: sampler calls")
    parser.add_argument("--block-length", type=int, default=None, help="generation: block size")
    parser.add_argument(
        "--tokens-per-step", type=int, default=None, help="generation: tokens committed per call"
    )
    parser.add_argument(
        "--log-samples", action="store_true", help="keep every document's responses in the JSON"
    )
    parser.add_argument(
        "--future-masks",
        action="store_true",
        help="bidirectional models: fill the input with masks up to the training length",
    )


def run_eval_command(args: argparse.Namespace) -> int:
    from pretrain.evaluation.harness import DLMEvalHarness
    from pretrain.evaluation.runner import evaluate_tasks
    from pretrain.evaluation.taskdirs import split_tasks

    tasks = split_tasks(args.tasks)
    lm = DLMEvalHarness(
        args.model,
        data=args.data,
        mc_samples=args.mc_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        steps=args.steps,
        block_length=args.block_length,
        tokens_per_step=args.tokens_per_step,
        future_masks=args.future_masks,
    )
    results = evaluate_tasks(
        lm,
        tasks,
        include_paths=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        seed=args.seed,
        log_samples=args.log_samples,
    )
    if results is None or not lm.dp.is_main:
        return 0
    print(format_results(results))
    if args.output:
        from lm_eval.utils import handle_non_serializable

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        print(f"wrote {out}")
    return 0


def format_results(results: dict) -> str:
    """The harness's table (and group table), then one line per task and request type of ours."""
    from lm_eval.utils import make_table

    lines = [make_table(results)]
    if results.get("groups"):
        lines.append(make_table(results, "groups"))
    report = results["dlm"]
    est = report["estimator"]
    samples = est["mc_samples"]
    sampling = f"{samples} Monte-Carlo samples per request" if samples else "no sampling"
    lines.append(
        f"estimator: {est['estimator']}, {sampling}, seed {est['seed']}, "
        f"{est['processes']} process(es)"
    )
    for task, row in report["tasks"].items():
        lines.append(
            f"  {task}: {row['requests']} likelihood requests, MC standard error mean "
            f"{row['mc_stderr_mean']:.4f} / max {row['mc_stderr_max']:.4f} nats; "
            f"{100 * row['decisions_within_2se']:.1f}% of decisions within 2 standard errors"
        )
    for kind, row in report["speed"].items():
        lines.append(
            f"  {kind}: {row['requests']} requests in {row['seconds']:.1f} s "
            f"({row['requests_per_s']:.1f} requests/s)"
        )
    return "\n".join(lines)
