"""`dlm launch --mode slurm` against a real single-node Slurm cluster started on localhost.

The cluster (munged + slurmctld + slurmd from Debian's `slurm-wlm`/`munge`) is started by
`scripts/local_slurm.sh` in a temporary directory; `.ci/run` installs the packages. If they are
absent the fixture installs them (root + apt); only if that is impossible are the cluster tests
skipped, with apt's error as the reason. The script generation tests need no cluster.

The cluster test submits one job and preempts it twice, both ways a cluster does:
1. slurm's warning signal: SIGUSR1 to the batch script (`scancel --batch --signal=USR1`, what
   `--signal=B:USR1@N` sends before the time limit); the script forwards it, the workers
   checkpoint, and the script requeues the job itself (`scontrol requeue`);
2. `scontrol requeue` by an operator/preemption: slurm sends SIGTERM to every process of the job,
   the workers checkpoint within `KillWait`, slurm requeues.
Each restart must resume from the checkpoint written at the signal, and the job must finish with
the per-step losses of an uninterrupted run of the same config, bit for bit.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, tiny_overrides

from launcher.cli import build_parser

TINY = REPO / "configs" / "tiny.yaml"
SETUP = REPO / "scripts" / "local_slurm.sh"
STEPS = 200


def render(capsys, *argv: str) -> str:
    args = build_parser().parse_args(["launch", str(TINY), *argv])
    assert args.run(args) == 0
    return capsys.readouterr().out


def test_sbatch_script_dry_run(capsys, tmp_path):
    script = render(
        capsys,
        f"run.output_dir={tmp_path}", "run.name=big", "launch.partition=gpu",
        "launch.account=proj", 'launch.time="2:00:00"', "launch.rdzv_port=29555",
        "launch.env=[NCCL_SOCKET_IFNAME=ib0]", "launch.container_image=nvcr.io#pytorch:25.01",
        "launch.container_mounts=[/data:/data]", "train.device=cuda",
        "--mode", "slurm", "--nnodes", "4", "--nproc-per-node", "8", "--dry-run",
    )  # fmt: skip
    run_dir = tmp_path / "big"
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=2:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        f"#SBATCH --output={run_dir}/logs/%x-%j.log",
        'RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "RDZV_PORT=$((29555 + SLURM_JOB_ID % 1000))",
        "export NCCL_SOCKET_IFNAME=ib0",
        "export DEEPSPEED_TIMEOUT=10",
        "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120",
    ]:
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--container-image='nvcr.io#pytorch:25.01'" in srun  # shell-quoted: '#' starts a comment
    assert f"--container-mounts=/data:/data,{tmp_path}:{tmp_path}" in srun
    assert f"--output={run_dir}/logs/%x-%j-node%n.log" in srun
    torchrun = script.split(srun, 1)[1].splitlines()[1]
    assert torchrun.split()[:3] == ["python", "-m", "torch.distributed.run"]  # the image's python
    for flag in [
        "--nnodes 4",
        '--rdzv-endpoint "$RDZV_HOST:$RDZV_PORT"',
        "--rdzv-backend c10d",
        "--nproc-per-node 8",
        "--max-restarts 0",
        "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "-m launcher.cli train",
        "train.resume=auto",
    ]:
        assert flag in torchrun, flag
    assert "scontrol requeue" in script and f"{run_dir}/PREEMPTED" in script
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    assert not run_dir.exists(), "--dry-run must write nothing"


def test_cpu_script_asks_for_no_gpus_and_runs_this_python(capsys, tmp_path):
    script = render(
        capsys, f"run.output_dir={tmp_path}", "train.device=cpu", "--mode", "slurm", "--dry-run"
    )
    assert "--gpus-per-node" not in script and "--container" not in script
    assert f"{sys.executable} -m torch.distributed.run" in script


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mode", "node", "--nnodes", "2"], "--rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2"], "--mode local runs one node"),
        (["parallel.tensor_parallel=2", "--nproc-per-node", "3"], "not divisible"),
        (["launch.env=[NOEQUALS]"], "launch.env: expected KEY=VALUE"),
        (["launch.nodes=0"], "launch.nodes must be positive"),
    ],
)
def test_bad_launch_requests_are_one_line_errors(capsys, argv, message):
    from launcher.cli import main

    assert main(["launch", str(TINY), *argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_submit_without_sbatch_is_a_clear_error(capsys, tmp_path, monkeypatch):
    from launcher.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["launch", str(TINY), f"run.output_dir={tmp_path}", "--mode", "slurm"]) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err


# ------------------------------------------------------------------ the real cluster
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not (shutil.which("slurmctld") and shutil.which("munged")):
        install = subprocess.run(["bash", str(SETUP), "install"], capture_output=True, text=True)
        if install.returncode != 0:
            pytest.skip(f"cannot install slurm-wlm/munge here: {install.stderr.strip()[-500:]}")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(
        ["bash", str(SETUP), "start", str(state)], capture_output=True, text=True
    )
    assert start.returncode == 0, f"local slurm cluster failed to start:\n{start.stderr[-3000:]}"
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "OMP_NUM_THREADS": "1"}
    yield env
    subprocess.run(["bash", str(SETUP), "stop", str(state)], capture_output=True)


def scontrol_job(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(what: str, predicate, timeout: float = 300, poll: float = 0.2):
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        if value := predicate():
            print(f"{what}: {time.monotonic() - start:.1f} s")
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def release(env: dict, job: str, restarts: int) -> None:
    """Slurm holds a requeued job for about two minutes (Reason=BeginTime); start it sooner.

    Not at once: slurmd revokes the killed run's job credential with a time stamp in whole
    seconds, and a new run whose credential is issued in that same second is killed ("Job
    credential revoked") instead of started. So the hold is lifted 2 s after it is first seen.
    """
    held_since: list[float] = []

    def started() -> bool:
        info = scontrol_job(env, job)
        if info["JobState"] == "PENDING" and info["Reason"] == "BeginTime":
            if not held_since:
                held_since.append(time.monotonic())
            if time.monotonic() - held_since[0] >= 2.0:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env)
        return info["JobState"] == "RUNNING" and info["Restarts"] == str(restarts)

    wait_until(f"restart {restarts} to start", started, poll=1.0)


def test_slurm_job_runs_is_preempted_twice_resumes_and_finishes(
    slurm, demo_data, runtime, tmp_path
):
    from test_launch import mlflow_losses

    from pretrain.config import load_config
    from pretrain.trainer import train

    overrides = tiny_overrides(
        demo_data, tmp_path, "slurmjob",
        **{"train.steps": STEPS, "train.log_interval": 1, "train.checkpoint_interval": 0,
           "train.device": "cpu", "tracking.enabled": True,
           "tracking.uri": f"sqlite:///{tmp_path}/slurmjob.db",
           "launch.rdzv_port": random.randrange(30000, 40000)},
    )  # fmt: skip
    submit = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "launch", str(TINY), *overrides, "--mode", "slurm"],
        env=slurm, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr[-3000:]
    job = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    run_dir = tmp_path / "slurmjob"
    node_log = run_dir / "logs" / f"slurmjob-{job}-node0.log"
    batch_log = run_dir / "logs" / f"slurmjob-{job}.log"

    def log_text() -> str:
        return node_log.read_text() if node_log.is_file() else ""

    def reached(step: int):
        return lambda: re.search(rf"\[dlm\] step {step}/", log_text())

    # 1. the warning signal to the batch script: the script requeues the job itself
    wait_until("step 10", reached(10))
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    first = int(
        wait_until("a checkpoint", lambda: re.search(r"preempted at step (\d+)", log_text())).group(
            1
        )
    )
    release(slurm, job, 1)
    wait_until("the resume", lambda: f"resumed at step {first} " in log_text())

    # 2. slurm requeues the job (SIGTERM to all its processes)
    wait_until(f"step {first + 10}", reached(first + 10))
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
    second = int(
        wait_until("a second checkpoint",
                   lambda: (m := re.findall(r"preempted at step (\d+)", log_text()))[1:] and m[1])
    )  # fmt: skip
    release(slurm, job, 2)
    wait_until("the job to complete", lambda: scontrol_job(slurm, job)["JobState"] == "COMPLETED")

    info, log, batch = scontrol_job(slurm, job), log_text(), batch_log.read_text()
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", info
    assert first < second < STEPS
    assert f"resumed at step {second} " in log and f"done at step {STEPS}" in log
    assert "got SIGUSR1" in batch and f"requeueing job {job}" in batch
    assert "got SIGTERM" in log
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()

    ref_db = f"tracking.uri=sqlite:///{tmp_path}/reference.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's workers (OMP_NUM_THREADS=1): the same float sums
    try:
        reference = train(load_config(TINY, [*overrides, "run.name=reference", ref_db]))
    finally:
        torch.set_num_threads(threads)
    assert mlflow_losses(tmp_path, "slurmjob") == reference.losses
