"""`dlm`: the one command-line entry point.

    dlm data build INPUT... --out DIR --seq-len N     txt/jsonl/parquet -> webdataset shards
    dlm data inspect DIR                              counts, decoded samples, token histogram
    dlm data subset DIR --out DIR --max-mb MB         the first shards of a dataset, within a budget
    dlm train CONFIG [key.sub=value ...]              train (resumes the run's latest checkpoint)
    dlm launch CONFIG [--mode local|node|slurm] ...   torchrun here, on several nodes, or sbatch
    dlm plan CONFIG [--layout TPxPPxDP[:ZERO][/EP]] ...  per-GPU memory table for parallel layouts
    dlm probe CKPT --prompts P.jsonl --out DIR        information-decay probe (JSON + PNG)
    dlm generate CKPT --prompt TEXT ...               sample with the objective's own decoder
    dlm eval CKPT_OR_EXPORT --tasks T1,T2 ...         lm-evaluation-harness tasks (MC likelihood)
    dlm ckpt convert CKPT --out DIR --tp T --pp P [--ep E]  re-shard a checkpoint for another layout
    dlm export CKPT OUT_DIR [--dtype D]               checkpoint -> Hugging Face model directory
    dlm import HF_DIR OUT_DIR                         HF Llama/Qwen2 causal LM -> our weights
    dlm config show CONFIG [key.sub=value ...]        print the resolved config as YAML
    dlm config docs                                   every config key with default and meaning

Subcommands are registered in `COMMANDS` (path -> (help, add_arguments, run)); heavy imports
happen inside the `run` functions so that `--help` is instant. User errors (`DLMError`) print one
line, `error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from pretrain.errors import DLMError
from pretrain.preemption import REQUEUE_EXIT_CODE

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied after the file, e.g. train.steps=50 model.num_layers=2",
    )


def _run_train(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors before the heavy imports
    from pretrain.trainer import train

    result = train(cfg)
    return REQUEUE_EXIT_CODE if result.preempted_at else 0  # stopped by a signal: run me again


def _add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    from launcher.launch import add_launch_arguments

    add_launch_arguments(parser)


def _run_launch(args: argparse.Namespace) -> int:
    from launcher.launch import run_launch

    return run_launch(args)


def _run_config_show(args: argparse.Namespace) -> int:
    from pretrain.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _run_config_docs(args: argparse.Namespace) -> int:
    from pretrain.config import field_docs

    for key, default, doc in field_docs():
        print(f"{key} = {default}\n    {doc}")
    return 0


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    from data_pipeline.commands import add_build_arguments

    add_build_arguments(parser)


def _run_build(args: argparse.Namespace) -> int:
    from data_pipeline.commands import run_build

    return run_build(args)


def _add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    from data_pipeline.inspection import add_inspect_arguments

    add_inspect_arguments(parser)


def _run_inspect(args: argparse.Namespace) -> int:
    from data_pipeline.inspection import run_inspect

    return run_inspect(args)


def _add_subset_arguments(parser: argparse.ArgumentParser) -> None:
    from data_pipeline.subset import add_subset_arguments

    add_subset_arguments(parser)


def _run_subset(args: argparse.Namespace) -> int:
    from data_pipeline.subset import run_subset

    return run_subset(args)


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    from pretrain.checkpoint.convert import add_convert_arguments

    add_convert_arguments(parser)


def _run_convert(args: argparse.Namespace) -> int:
    from pretrain.checkpoint.convert import run_convert

    return run_convert(args)


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from pretrain.parallel.memory import add_plan_arguments

    add_plan_arguments(parser)


def _run_plan(args: argparse.Namespace) -> int:
    from pretrain.parallel.memory import run_plan

    return run_plan(args)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from pretrain.hf.commands import add_export_arguments

    add_export_arguments(parser)


def _run_export(args: argparse.Namespace) -> int:
    from pretrain.hf.commands import run_export

    return run_export(args)


def _add_import_arguments(parser: argparse.ArgumentParser) -> None:
    from pretrain.hf.commands import add_import_arguments

    add_import_arguments(parser)


def _run_import(args: argparse.Namespace) -> int:
    from pretrain.hf.commands import run_import

    return run_import(args)


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from pretrain.evaluation.cli import add_eval_arguments

    add_eval_arguments(parser)


def _run_eval(args: argparse.Namespace) -> int:
    from pretrain.evaluation.cli import run_eval_command

    return run_eval_command(args)


COMMANDS: dict[tuple[str, ...], Command] = {
    ("data", "build"): (
        "tokenize text/jsonl files (or the built-in demo corpus) into webdataset shards",
        _add_build_arguments,
        _run_build,
    ),
    ("data", "inspect"): (
        "summarise a built dataset: counts per split, decoded samples, token histogram",
        _add_inspect_arguments,
        _run_inspect,
    ),
    ("data", "subset"): (
        "cut a smaller dataset (the first shards, same tokenizer) within a size budget",
        _add_subset_arguments,
        _run_subset,
    ),
    ("train",): (
        "train a diffusion LM from a YAML config (auto-resumes from the latest checkpoint)",
        _config_arguments,
        _run_train,
    ),
    ("launch",): (
        "start training with torchrun: locally, one node of a multi-node job, or via slurm",
        _add_launch_arguments,
        _run_launch,
    ),
    ("probe",): (
        "information-decay probe of a checkpoint: prompt + K masks -> entropy, p(eos), plot",
        lambda p: __import__("pretrain.probe.cli").probe.cli.add_probe_arguments(p),
        lambda a: __import__("pretrain.probe.cli").probe.cli.run_probe_command(a),
    ),
    ("generate",): (
        "generate text from a checkpoint with the sampler matching its training objective",
        lambda p: __import__("pretrain.probe.cli").probe.cli.add_generate_arguments(p),
        lambda a: __import__("pretrain.probe.cli").probe.cli.run_generate_command(a),
    ),
    ("eval",): (
        "evaluate on lm-evaluation-harness tasks (Monte-Carlo likelihood bound, generation)",
        _add_eval_arguments,
        _run_eval,
    ),
    ("plan",): (
        "per-GPU memory of a config under parallel layouts (weights, grads, optimizer, activ.)",
        _add_plan_arguments,
        _run_plan,
    ),
    ("ckpt", "convert"): (
        "re-shard a checkpoint for another tensor/pipeline layout (or consolidate: --tp 1 --pp 1)",
        _add_convert_arguments,
        _run_convert,
    ),
    ("export",): (
        "write a checkpoint as a Hugging Face model directory (AutoModelForMaskedLM)",
        _add_export_arguments,
        _run_export,
    ),
    ("import",): (
        "initialise our model from a Hugging Face Llama/Qwen2 causal LM (weights-only checkpoint)",
        _add_import_arguments,
        _run_import,
    ),
    ("config", "show"): ("print the resolved config as YAML", _config_arguments, _run_config_show),
    ("config", "docs"): (
        "list every config key with its default and meaning",
        lambda p: None,
        _run_config_docs,
    ),
}

GROUP_HELP = {
    "data": "build and inspect datasets",
    "ckpt": "inspect and convert checkpoints",
    "config": "inspect configs",
}


def selected_command(argv: list[str]) -> tuple[str, ...] | None:
    """The command path `argv` names (its leading words), or None."""
    words = [w for w in argv[:2] if not w.startswith("-")]
    for n in (2, 1):
        if tuple(words[:n]) in COMMANDS:
            return tuple(words[:n])
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `argv`, only the command it names gets its arguments
    (their modules are imported to declare them), so `dlm --help` and light commands start
    without importing torch, DeepSpeed or Megatron."""
    only = selected_command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="dlm", description="Pretrain masked and hybrid diffusion language models."
    )
    root = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, (help_text, add_arguments, run) in COMMANDS.items():
        if len(path) == 1:
            sub = root.add_parser(path[0], help=help_text, description=help_text)
        else:
            if path[0] not in groups:
                group = root.add_parser(path[0], help=GROUP_HELP[path[0]])
                groups[path[0]] = group.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=help_text)
        if argv is None or path == only:
            add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Megatron-core warns at import that optional fused kernels (Apex, Transformer Engine) are
    # absent; we never use them, so the warning is noise on every command.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.run(args)
    except DLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def entry() -> int:
    """The `dlm` command (and `python -m launcher.cli`): `main`, then, where it succeeded or
    stopped for a requeue, the process groups destroyed before the process exits
    (`shutdown_runtime`)."""
    code = main()
    if code in (0, REQUEUE_EXIT_CODE) and "torch.distributed" in sys.modules:
        from pretrain.parallel.runtime import shutdown_runtime

        shutdown_runtime()
    return code


if __name__ == "__main__":
    sys.exit(entry())
