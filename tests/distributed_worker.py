"""Runs training runs inside a real multi-process job; launched by the tests with torchrun.

    python -m torch.distributed.run --nproc_per_node N tests/distributed_worker.py SPEC OUT

SPEC is a JSON list of runs, each {"overrides": [...], "stop_at": int|null, "crash_at_save":
int|null, "cpu_sequence_parallel": bool, "clock_step_s": [float per rank]|null, "fail_write_at":
{"step": int, "rank": int}|null}; OUT receives, from rank 0, each run's per-step losses and
evaluations (rewritten after each run). `crash_at_save` kills this process (os._exit, as a
preemption or OOM kill would) while sealing the checkpoint of that step, after every rank has
written its shard: the launcher then tears the job down. `clock_step_s` gives each rank a clock
for `train.checkpoint_minutes` that advances that many seconds per reading (clocks that
disagree). `fail_write_at` makes that rank's shard write of that step fail with an OSError (a
read-only disk); the error each rank raises is written to OUT.rank<N>, then re-raised.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(spec_path: str, out_path: str) -> None:
    import torch

    import pretrain.checkpoint.manager as manager
    from pretrain.checkpoint.schedule import SaveSchedule
    from pretrain.config import load_config
    from pretrain.trainer import train

    runs = json.loads(Path(spec_path).read_text())
    if any(run.get("cpu_sequence_parallel") for run in runs):
        # Megatron-core allocates its sequence-parallel gather/scatter buffers on
        # torch.cuda.current_device(); on a CPU-only test machine point those allocations at the
        # CPU. Only the buffers' device changes: every collective still runs for real (gloo).
        torch.cuda.current_device = lambda: torch.device("cpu")
    rng = torch.get_rng_state()
    results = []
    for run in runs:
        torch.set_rng_state(rng)  # each run as in a process of its own (the state is saved)
        crash_at = run.get("crash_at_save")
        if crash_at is not None:
            real_seal = manager.seal

            def seal(staging, final, step, config_yaml, _real=real_seal, _crash=crash_at):
                if step == _crash:
                    os._exit(17)
                return _real(staging, final, step, config_yaml)

            manager.seal = seal
        rank = int(os.environ.get("RANK", "0"))
        if run.get("clock_step_s"):
            SaveSchedule.clock = staticmethod(_ticking(run["clock_step_s"][rank]))
        if run.get("fail_write_at") and run["fail_write_at"]["rank"] == rank:
            _fail_shard_write(manager, run["fail_write_at"]["step"])
        cfg = load_config(REPO / "configs" / "tiny.yaml", run["overrides"])
        try:
            result = train(cfg, stop_at=run.get("stop_at"))
        except Exception as exc:
            if run.get("fail_write_at"):
                Path(f"{out_path}.rank{rank}").write_text(f"{type(exc).__name__}: {exc}")
            raise
        results.append(
            {
                "losses": {str(k): v for k, v in result.losses.items()},
                "evals": {str(k): v for k, v in result.evals.items()},
                "checkpoint": str(result.checkpoint),
            }
        )
        if rank == 0:  # after every run: a job whose last run fails still reports the others
            Path(out_path).write_text(json.dumps(results))


def _ticking(step_s: float):
    """A clock that advances `step_s` seconds each time it is read."""
    now = [0.0]

    def clock() -> float:
        now[0] += step_s
        return now[0]

    return clock


def _fail_shard_write(manager, step: int) -> None:
    real = manager.write_rank_shard

    def write_rank_shard(directory, rank, tensors, meta):
        if directory.name.startswith(f"step_{step:08d}."):
            raise OSError(30, "Read-only file system", str(directory))
        return real(directory, rank, tensors, meta)

    manager.write_rank_shard = write_rank_shard


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from pretrain.parallel.runtime import shutdown_runtime

    shutdown_runtime()  # every run succeeded: no gloo threads left to the interpreter's exit
