"""Runs training runs inside a real multi-process job; launched by the tests with torchrun.

    python -m torch.distributed.run --nproc_per_node N tests/distributed_worker.py SPEC OUT

SPEC is a JSON list of runs, each {"overrides": [...], "stop_at": int|null, "crash_at_save":
int|null, "cpu_sequence_parallel": bool}; OUT receives, from rank 0, each run's per-step losses
and evaluations. `crash_at_save` kills this process (os._exit, as a preemption or OOM kill
would) while sealing the checkpoint of that step, after every rank has written its shard: the
launcher then tears the job down.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(spec_path: str, out_path: str) -> None:
    import pretrain.checkpoint.manager as manager
    from pretrain.config import load_config
    from pretrain.trainer import train

    runs = json.loads(Path(spec_path).read_text())
    if any(run.get("cpu_sequence_parallel") for run in runs):
        # Megatron-core allocates its sequence-parallel gather/scatter buffers on
        # torch.cuda.current_device(); on a CPU-only test machine point those allocations at the
        # CPU. Only the buffers' device changes: every collective still runs for real (gloo).
        import torch

        torch.cuda.current_device = lambda: torch.device("cpu")
    results = []
    for run in runs:
        crash_at = run.get("crash_at_save")
        if crash_at is not None:
            real_seal = manager.seal

            def seal(staging, final, step, config_yaml, _real=real_seal, _crash=crash_at):
                if step == _crash:
                    os._exit(17)
                return _real(staging, final, step, config_yaml)

            manager.seal = seal
        cfg = load_config(REPO / "configs" / "tiny.yaml", run["overrides"])
        result = train(cfg, stop_at=run.get("stop_at"))
        results.append(
            {
                "losses": {str(k): v for k, v in result.losses.items()},
                "evals": {str(k): v for k, v in result.evals.items()},
                "checkpoint": str(result.checkpoint),
            }
        )
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
