"""`dlm launch`: start a training run with torchrun on this machine, on several nodes, or on slurm.

    dlm launch CONFIG [KEY=VALUE ...]                             torchrun --standalone here
    dlm launch CONFIG --mode node --nnodes 2 --rdzv-endpoint H:P  one node of a multi-node job
    dlm launch CONFIG --mode slurm [--dry-run]                    write + sbatch a batch script

Every mode runs the same worker, `python -m launcher.cli train CONFIG ...` under torchrun, with
`train.resume=auto`, so a restarted or requeued job continues from its latest complete checkpoint.
The launchers are a small registry (`LAUNCHERS`); each one turns the config plus the command-line
options into a command (or a script) and runs it.

Stopping and faults (see docs/launching.md for the whole story):
- torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT and SIGUSR1 to its workers
  (`--signals-to-handle`) and waits `launch.shutdown_timeout_s` for them to checkpoint before it
  kills them; the trainer checkpoints at the next step boundary (`pretrain.preemption`).
- A worker that dies makes torchrun (`--max-restarts 0`) stop the other workers on its node; the
  other nodes' workers fail their next collective when the connection drops, or after
  `launch.collective_timeout_min` (DEEPSPEED_TIMEOUT) if the peer vanished without a word.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import Config
from pretrain.errors import DLMError
from pretrain.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE

HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Signals torchrun catches and forwards to its workers (its default lacks SIGUSR1)."""


@dataclass(frozen=True, kw_only=True)
class LaunchRequest:
    """The resolved config plus what the command line asked for."""

    cfg: Config
    config_path: Path
    overrides: list[str]
    nnodes: int
    nproc_per_node: int
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    dry_run: bool = False

    @property
    def run_dir(self) -> Path:
        return (Path(self.cfg.run.output_dir) / self.cfg.run.name).resolve()

    def worker_args(self) -> list[str]:
        """`dlm train` arguments; `train.resume=auto` makes every (re)start continue the run."""
        return ["-m", "launcher.cli", "train", str(self.config_path), *self.overrides]

    def environment(self) -> dict[str, str]:
        """Variables every node's torchrun and workers need (besides what torchrun sets)."""
        env = {
            # The process-group timeout: a collective stuck on a vanished peer fails after this.
            "DEEPSPEED_TIMEOUT": str(self.cfg.launch.collective_timeout_min),
            # How long torchrun lets workers checkpoint after a stop signal before SIGKILL.
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(self.cfg.launch.shutdown_timeout_s),
            # NCCL reports a failed/timed-out collective as an error instead of hanging.
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(item.split("=", 1) for item in self.cfg.launch.env)
        return env


def torchrun_command(req: LaunchRequest, *, python: str, rendezvous: list[str]) -> list[str]:
    return [
        python, "-m", "torch.distributed.run",
        *rendezvous,
        "--nproc-per-node", str(req.nproc_per_node),
        "--max-restarts", "0",
        "--signals-to-handle", HANDLED_SIGNALS,
        *req.worker_args(),
    ]  # fmt: skip


def local_command(req: LaunchRequest) -> list[str]:
    if req.nnodes != 1:
        raise DLMError(f"--mode local runs one node, not {req.nnodes}; use --mode node or slurm")
    return torchrun_command(req, python=sys.executable, rendezvous=["--standalone"])


def node_command(req: LaunchRequest) -> list[str]:
    if not req.rdzv_endpoint or ":" not in req.rdzv_endpoint:
        raise DLMError("--mode node needs --rdzv-endpoint HOST:PORT (the first node's address)")
    rendezvous = [
        "--nnodes", str(req.nnodes),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", req.rdzv_endpoint,
        "--rdzv-id", req.cfg.run.name,
    ]  # fmt: skip
    if req.node_rank is not None:
        rendezvous += ["--node-rank", str(req.node_rank)]
    return torchrun_command(req, python=sys.executable, rendezvous=rendezvous)


def run_torchrun(req: LaunchRequest, command: list[str]) -> int:
    """Run torchrun in the foreground, forwarding stop signals; REQUEUE_EXIT_CODE if preempted."""
    env = {**os.environ, **req.environment()}
    print("[dlm] " + " ".join(shlex.quote(c) for c in command), flush=True)
    if req.dry_run:
        return 0
    marker = req.run_dir / PREEMPTED_MARKER
    marker.unlink(missing_ok=True)  # a stale marker must not requeue a job that failed
    child = subprocess.Popen(command, env=env)
    forwarded = [signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP]
    previous = {s: signal.signal(s, lambda sig, _f: child.send_signal(sig)) for s in forwarded}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if marker.is_file():
        print(f"[dlm] preempted ({marker}); exit {REQUEUE_EXIT_CODE}: start again to resume")
        return REQUEUE_EXIT_CODE
    return status


def launch_local(req: LaunchRequest) -> int:
    return run_torchrun(req, local_command(req))


def launch_node(req: LaunchRequest) -> int:
    return run_torchrun(req, node_command(req))


def launch_slurm(req: LaunchRequest) -> int:
    from launcher.slurm import sbatch_script, submit

    script = sbatch_script(req)
    if req.dry_run:
        print(script, end="")
        return 0
    return submit(req, script)


LAUNCHERS: dict[str, Callable[[LaunchRequest], int]] = {
    "local": launch_local,
    "node": launch_node,
    "slurm": launch_slurm,
}


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument(
        "--mode",
        choices=sorted(LAUNCHERS),
        default="local",
        help="local: torchrun --standalone; node: one node of a multi-node torchrun job; "
        "slurm: generate an sbatch script and submit it (default: local)",
    )
    parser.add_argument("--nnodes", type=int, help="nodes (default: launch.nodes)")
    parser.add_argument(
        "--nproc-per-node", type=int, help="processes per node (default: launch.gpus_per_node)"
    )
    parser.add_argument("--node-rank", type=int, help="this node's rank (--mode node; optional)")
    parser.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (--mode node)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the command (or sbatch script), run nothing"
    )


def run_launch(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    overrides = [*args.overrides, "train.resume=auto"]
    cfg = load_config(args.config, overrides)
    nnodes = args.nnodes or cfg.launch.nodes
    nproc = args.nproc_per_node or cfg.launch.gpus_per_node
    if nnodes <= 0 or nproc <= 0:
        raise DLMError(f"--nnodes and --nproc-per-node must be positive, got {nnodes}, {nproc}")
    world = nnodes * nproc
    model_parallel = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    if world % model_parallel:
        raise DLMError(
            f"{nnodes} node(s) x {nproc} process(es) = {world} is not divisible by "
            f"parallel.tensor_parallel x parallel.pipeline_parallel = {model_parallel}"
        )
    req = LaunchRequest(
        cfg=cfg,
        config_path=Path(args.config).resolve(),
        overrides=overrides,
        nnodes=nnodes,
        nproc_per_node=nproc,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        dry_run=args.dry_run,
    )
    return LAUNCHERS[args.mode](req)
