"""`dlm launch` for real: torchrun jobs on this machine (gloo), the generated sbatch script, faults.

- Two "nodes": two `dlm launch --mode node --nnodes 2` launchers on 127.0.0.1 (c10d rendezvous,
  one worker each) train the tiny config; their per-step losses and final parameters must equal
  those of a single-node `dlm launch --nproc-per-node 2` (same world size, same global layout).
  Expected bit for bit (same ranks, same collectives); asserted within 1e-6.
- Preemption: SIGTERM to `dlm launch` mid-run reaches the workers through torchrun; they
  checkpoint at a step boundary and the launcher exits 75 (requeue); launching again resumes, and
  the losses of both parts together equal the uninterrupted run's bit for bit.
- A worker killed with SIGKILL stops the whole job (no hang) within a generous bound.
Losses are read back exactly from each run's MLflow store (sqlite, float64).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, tiny_overrides

from pretrain.checkpoint.format import CheckpointReader
from pretrain.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 60
LOSS_ATOL = 1e-6
DEATH_BOUND_S = 120  # a dead rank must end the job well within this (observed: a few seconds)


def run_overrides(data: Path, out: Path, name: str, **extra) -> list[str]:
    values = {
        "train.steps": STEPS,
        "train.log_interval": 1,
        "train.checkpoint_interval": 0,
        "train.device": "cpu",
        "tracking.enabled": True,
        "tracking.uri": f"sqlite:///{out / name}.db",
        **extra,
    }
    return tiny_overrides(data, out, name, **values)


def dlm_launch(overrides: list[str], *options: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "launcher.cli", "launch", str(TINY), *overrides, *options]
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def mlflow_losses(out: Path, name: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / name}.db")
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.mlflow.runName = '{name}'",
    )
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_params(run_dir: Path) -> CheckpointReader:
    return CheckpointReader(
        run_dir / "checkpoints" / (run_dir / "checkpoints/latest").read_text().strip()
    )


@pytest.fixture(scope="module")
def single_node(demo_data, tmp_path_factory):
    """The reference: one node, two workers (DP=2), uninterrupted."""
    out = tmp_path_factory.mktemp("launch")
    status, log = finish(
        dlm_launch(run_overrides(demo_data, out, "single"), "--nproc-per-node", "2")
    )
    assert status == 0, log[-4000:]
    return {"out": out, "losses": mlflow_losses(out, "single")}


def test_two_nodes_equal_one_node(single_node, demo_data):
    out = single_node["out"]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        dlm_launch(
            run_overrides(demo_data, out, "twonode"),
            "--mode",
            "node",
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--nproc-per-node",
            "1",
            "--rdzv-endpoint",
            endpoint,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    results = [finish(node) for node in nodes]
    for status, log in results:
        assert status == 0, log[-4000:]
    assert "2 process(es) (tp=1 pp=1 dp=2)" in results[0][1] + results[1][1]
    got, want = mlflow_losses(out, "twonode"), single_node["losses"]
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= LOSS_ATOL, f"max loss difference {worst:.3g}"
    a, b = final_params(out / "twonode"), final_params(out / "single")
    assert a.names() == b.names()
    assert max((a.full(n) - b.full(n)).abs().max().item() for n in a.names()) <= LOSS_ATOL


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    """Read the launcher's output until a line contains `needle`; returns what was read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never appeared:\n" + "".join(seen)[-4000:])


def test_sigterm_checkpoints_exits_for_requeue_and_resumes_exactly(single_node, demo_data):
    out = single_node["out"]
    overrides = run_overrides(demo_data, out, "preempted")
    proc = dlm_launch(overrides, "--nproc-per-node", "2")
    wait_for_line(proc, "[dlm] step 3/")
    proc.send_signal(signal.SIGTERM)  # as slurm (or any scheduler) does to the launcher
    status, log = finish(proc)
    assert status == REQUEUE_EXIT_CODE, log[-4000:]
    marker = out / "preempted" / PREEMPTED_MARKER
    assert marker.is_file(), log[-4000:]
    first = mlflow_losses(out, "preempted")
    stopped = max(first)
    assert 3 <= stopped < STEPS, f"stopped at {stopped}: the signal must land mid-run"
    assert f"step {stopped} checkpoint" in log and "preempted at step" in log

    status, log = finish(dlm_launch(overrides, "--nproc-per-node", "2"))
    assert status == 0, log[-4000:]
    assert f"resumed at step {stopped}" in log
    assert not marker.exists()
    assert mlflow_losses(out, "preempted") == single_node["losses"]  # bit for bit


def test_a_dead_rank_stops_the_whole_job(demo_data, tmp_path):
    proc = dlm_launch(
        run_overrides(demo_data, tmp_path, "dies", **{"train.steps": 10**6}),
        "--nproc-per-node",
        "2",
    )
    wait_for_line(proc, "[dlm] step 5/")
    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "train" in p.cmdline() and "torch.distributed.run" not in p.cmdline()
    ]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    start = time.monotonic()
    workers[1].kill()  # SIGKILL, as an OOM kill or a node failure would
    status, log = finish(proc, timeout=DEATH_BOUND_S)
    elapsed = time.monotonic() - start
    assert status not in (0, REQUEUE_EXIT_CODE), log[-3000:]
    assert elapsed < DEATH_BOUND_S
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    print(f"job stopped {elapsed:.1f} s after a worker was killed")


def test_sigterm_to_every_process_with_loader_workers_still_checkpoints(demo_data, tmp_path):
    """Slurm signals every process of a job step, DataLoader workers included. The workers must
    outlive the signal (they end with the trainer), or PyTorch aborts the trainer mid-step when
    it sees a worker die, and the preemption checkpoint is never written."""
    overrides = run_overrides(demo_data, tmp_path, "workers", **{"data.num_workers": 2})
    # a fresh world of one: not the rendezvous variables of a process group this pytest holds
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "train", str(TINY), *overrides],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as a job step's processes are
    )  # fmt: skip
    wait_for_line(proc, "[dlm] step 3/")
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 2, "expected the DataLoader worker processes"
    os.killpg(proc.pid, signal.SIGTERM)
    status, log = finish(proc)
    assert status == REQUEUE_EXIT_CODE, log[-4000:]
    assert (tmp_path / "workers" / PREEMPTED_MARKER).is_file(), log[-4000:]
    assert "preempted at step" in log and " checkpoint " in log
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "the loader workers must end with the trainer"


def _guard_worker(rank: int, world: int, port: int, queue) -> None:
    """Each rank steps, all-reducing on the default group as training does, and asks the guard
    after every step; only rank 1 is signalled, after its step 3."""
    import torch
    import torch.distributed as dist

    from pretrain.preemption import PreemptionGuard

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    guard = PreemptionGuard.install()
    try:
        for step in range(1, 50):
            grads = torch.full((4,), float(rank))
            dist.all_reduce(grads)  # a training collective between the stop checks
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # lands in the handler before the check
            if guard.should_stop():
                queue.put((rank, step, guard.received))
                return
        queue.put((rank, None, guard.received))
    finally:
        guard.uninstall()
        dist.destroy_process_group()


def test_a_signal_seen_by_one_rank_stops_every_rank_at_the_same_step():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    world, port = 3, free_port()
    procs = [ctx.Process(target=_guard_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [step for _, step, _ in results] == [3, 3, 3], results
    # only rank 1 received the signal; the others stop because the flag was reduced over all
    assert [received for _, _, received in results] == [None, signal.SIGUSR1, None]
