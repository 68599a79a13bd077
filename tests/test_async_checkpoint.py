"""Checkpoints written off the training step (`train.checkpoint_async`) and time-based saves
(`train.checkpoint_minutes`): the same files as a synchronous save, an exact resume, failures
that stop the run without sealing anything, a SIGKILL during a background write that loses
nothing, and ranks that save at the same step whatever their clocks say. The step-time stall
itself is measured by bench/checkpoint_stall.py (figures in docs/reliability.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides
from test_parallel import launch

from pretrain.checkpoint import manager
from pretrain.checkpoint.manager import MARKER, CheckpointManager, verify_checkpoint
from pretrain.checkpoint.schedule import SaveSchedule
from pretrain.config import load_config
from pretrain.errors import CheckpointError
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"
EVERY_2 = {
    "train.checkpoint_interval": 2,
    "train.keep_last": 4,
    "train.log_interval": 1,
}  # background saves at 2, 4, 6; the final one (8) is waited for
ASYNC = {**EVERY_2, "train.checkpoint_async": True}


def files(ckpt: Path) -> dict:
    """The marker's file entries (size + XXH3-128) except config.yaml, which names the run."""
    listed = verify_checkpoint(ckpt)["files"]
    return {name: entry for name, entry in listed.items() if name != "config.yaml"}


def steps_saved(ckpts: Path) -> list[int]:
    return [int(p.name[5:]) for p in CheckpointManager(ckpts, keep_last=9).complete_checkpoints()]


@pytest.fixture(scope="module")
def sync_run(runtime, demo_data, tmp_path_factory):
    """The reference: 8 steps, synchronous saves every 2 steps."""
    out = tmp_path_factory.mktemp("sync")
    torch.manual_seed(0)  # the global RNG each test starts from (conftest): it is checkpointed
    result = train(load_config(TINY, tiny_overrides(demo_data, out, "sync", **EVERY_2)))
    return {"ckpts": out / "sync" / "checkpoints", "losses": result.losses}


def test_background_saves_write_the_same_files_and_do_not_change_training(
    sync_run, demo_data, tmp_path, capsys
):
    capsys.readouterr()
    result = train(load_config(TINY, tiny_overrides(demo_data, tmp_path, "a", **ASYNC)))
    out = capsys.readouterr().out
    ckpts = tmp_path / "a" / "checkpoints"
    assert result.losses == sync_run["losses"]  # bit for bit
    assert steps_saved(ckpts) == steps_saved(sync_run["ckpts"]) == [2, 4, 6, 8]
    for n in (2, 4, 6, 8):
        name = f"step_{n:08d}"
        assert files(ckpts / name) == files(sync_run["ckpts"] / name), name  # same hashes
    for n in (2, 4, 6):  # reported once sealed, with what the step waited for
        assert f"[dlm] step {n} checkpoint {ckpts / f'step_{n:08d}'} (the step waited" in out
    assert f"[dlm] step 8 checkpoint {ckpts / 'step_00000008'}\n" in out  # the last: waited for
    assert (ckpts / "latest").read_text() == "step_00000008\n"
    assert not list(ckpts.glob("*.partial*"))


def test_a_failed_background_write_stops_the_run_and_seals_nothing(
    sync_run, demo_data, tmp_path, monkeypatch
):
    real = manager.write_rank_shard
    failed_on = []

    def read_only_disk(directory, rank, tensors, meta):
        if directory.name.startswith("step_00000006."):
            failed_on.append(threading.current_thread().name)
            raise OSError(30, "Read-only file system", str(directory))
        return real(directory, rank, tensors, meta)

    monkeypatch.setattr(manager, "write_rank_shard", read_only_disk)
    with pytest.raises(CheckpointError) as info:
        train(load_config(TINY, tiny_overrides(demo_data, tmp_path, "ro", **ASYNC)))
    message = str(info.value)
    ckpts = tmp_path / "ro" / "checkpoints"
    assert failed_on == ["dlm-checkpoint"]  # it failed off the training thread ...
    assert len(message.splitlines()) == 1  # ... and surfaced on it, as one line
    assert "the checkpoint of step 6 was not written: rank 0 failed writing its files" in message
    assert "Read-only file system" in message and "step_00000004 stays the latest" in message
    (staging,) = ckpts.glob("step_00000006.partial.*")
    assert not (staging / MARKER).exists()
    assert steps_saved(ckpts) == [2, 4]  # 6 never sealed, and the run stopped before 8
    assert CheckpointManager(ckpts, keep_last=4).resume_point() == (ckpts / "step_00000004", None)
    assert files(ckpts / "step_00000004") == files(sync_run["ckpts"] / "step_00000004")


def test_a_failure_after_the_seal_says_the_checkpoint_is_complete(
    runtime, demo_data, tmp_path, monkeypatch
):
    """Step 6 is sealed but `latest` cannot be replaced: the error says so, and `latest` still
    names step 4, which the resume takes (step 6 is complete; nothing is half-written)."""
    real = manager.atomic_write_text

    def failing_latest(path, text):
        if path.name == "latest" and text.startswith("step_00000006"):
            raise OSError(28, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(manager, "atomic_write_text", failing_latest)
    with pytest.raises(CheckpointError) as info:
        train(load_config(TINY, tiny_overrides(demo_data, tmp_path, "l", **ASYNC)))
    ckpts, message = tmp_path / "l" / "checkpoints", str(info.value)
    assert f"{ckpts / 'step_00000006'}: the checkpoint of step 6 is complete, but rank 0" in message
    assert "No space left on device" in message and "step_00000004 is the latest" in message
    assert steps_saved(ckpts) == [2, 4, 6]
    assert CheckpointManager(ckpts, keep_last=4).resume_point() == (ckpts / "step_00000004", None)


def _slow_write_of(step: int, then=lambda: None):
    """A shard writer that, for `step`, calls `then` and waits a second before writing."""
    real = manager.write_rank_shard

    def slow(directory, rank, tensors, meta):
        if directory.name.startswith(f"step_{step:08d}."):
            then()
            time.sleep(1.0)
        return real(directory, rank, tensors, meta)

    return slow


def test_preemption_waits_for_the_save_in_flight(runtime, demo_data, tmp_path, monkeypatch, capsys):
    """SIGTERM arrives while step 6 is being written in the background: the run stops at the
    next step boundary, waits for step 6, then writes its preemption checkpoint."""
    sigterm = lambda: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731 - the "scheduler"
    monkeypatch.setattr(manager, "write_rank_shard", _slow_write_of(6, sigterm))
    capsys.readouterr()
    result = train(
        load_config(TINY, tiny_overrides(demo_data, tmp_path, "p", **ASYNC, **{"train.steps": 20}))
    )
    out = capsys.readouterr().out
    ckpts = tmp_path / "p" / "checkpoints"
    stop = result.preempted_at
    assert stop is not None and 6 < stop < 20, out
    assert f"[dlm] step {stop}: waited" in out and "for step_00000006 to finish writing" in out
    assert steps_saved(ckpts) == [2, 4, 6, stop]
    assert (ckpts / "latest").read_text() == f"step_{stop:08d}\n"
    assert json.loads((tmp_path / "p" / "PREEMPTED").read_text()) == {"step": stop}


def test_an_error_waits_for_the_save_in_flight(runtime, demo_data, tmp_path, monkeypatch):
    """The step after step 6's save fails while that save is still being written: the run
    finishes writing it before it releases the run lock and raises."""
    from pretrain.run import Run

    real_batches = Run.step_batches

    def failing(self, step):
        if step == 6:  # 0-based: the 7th step
            raise RuntimeError("injected failure in step 7")
        return real_batches(self, step)

    monkeypatch.setattr(manager, "write_rank_shard", _slow_write_of(6))
    monkeypatch.setattr(Run, "step_batches", failing)
    with pytest.raises(RuntimeError, match="injected failure in step 7"):
        train(load_config(TINY, tiny_overrides(demo_data, tmp_path, "e", **ASYNC)))
    ckpts = tmp_path / "e" / "checkpoints"
    assert steps_saved(ckpts) == [2, 4, 6] and (ckpts / "latest").read_text() == "step_00000006\n"
    assert not list(ckpts.glob("*.partial*"))


STALL = """
import sys, threading, time
from pathlib import Path
import torch
import pretrain.checkpoint.manager as manager
from pretrain.config import load_config
from pretrain.trainer import train

real, flag = manager.write_rank_shard, Path(sys.argv[1])

def stalled(directory, rank, tensors, meta):
    if directory.name.startswith("step_00000006."):
        real(directory, rank, tensors, meta)  # half of the save is on disk, then it hangs
        flag.write_text(threading.current_thread().name)
        time.sleep(600)
    return real(directory, rank, tensors, meta)

manager.write_rank_shard = stalled
torch.manual_seed(0)  # as the reference run: the global RNG state is checkpointed
train(load_config(sys.argv[2], sys.argv[3:]))
"""


def test_sigkill_during_a_background_write_loses_nothing(sync_run, demo_data, tmp_path):
    """Step 6's background write hangs half-way; training goes on to step 8 meanwhile, and the
    process is killed there (the final save waits for step 6's). Step 4, itself written in the
    background, stays `latest`, and the resume from it equals the uninterrupted run."""
    flag = tmp_path / "in-flight"
    overrides = tiny_overrides(demo_data, tmp_path, "k", **ASYNC)
    world = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in world}
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL, str(flag), str(TINY), *overrides],
        env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[dlm] step 8/8"):
                break
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    log = "".join(seen)
    assert seen and seen[-1].startswith("[dlm] step 8/8"), log[-3000:]
    assert flag.read_text() == "dlm-checkpoint"  # the write hung off the training thread
    ckpts = tmp_path / "k" / "checkpoints"
    assert "[dlm] step 4 checkpoint" in log and "[dlm] step 6 checkpoint" not in log
    assert (ckpts / "latest").read_text() == "step_00000004\n"
    (staging,) = ckpts.glob("step_00000006.partial.*")
    assert (staging / "shards").is_dir() and not (staging / MARKER).exists()
    resumed = train(load_config(TINY, overrides))
    assert resumed.losses == {s: sync_run["losses"][s] for s in (5, 6, 7, 8)}
    for n in (4, 6, 8):
        assert files(ckpts / f"step_{n:08d}") == files(sync_run["ckpts"] / f"step_{n:08d}")
    assert not staging.exists()  # stale under the run lock: pruned by the next good save


def test_the_schedule_combines_steps_and_minutes(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(SaveSchedule, "clock", staticmethod(lambda: now[0]))
    schedule = SaveSchedule(interval=4, minutes=0.5)
    due = []
    for step in range(1, 13):
        now[0] += 0.0 if step == 6 else 10.0  # 10 s per step; step 6 takes no time
        due.append(schedule.due(step))
    # 30 s after the last save (3, 11) or a multiple of 4 (4, 12), or both (8: 30 s after 4,
    # because step 6 took no time); every save restarts the clock
    assert [s for s, d in enumerate(due, 1) if d] == [3, 4, 8, 11, 12]
    off = SaveSchedule(interval=0, minutes=0)
    assert not any(off.due(step) for step in range(1, 100))


@pytest.fixture(scope="module")
def two_ranks(demo_data, tmp_path_factory):
    """One job of two ranks (gloo): synchronous saves, background saves, timed saves with
    clocks that disagree, and last a run whose rank 1 cannot write step 4 (the job fails)."""
    work = tmp_path_factory.mktemp("two-ranks")
    base = {"train.steps": 7, "train.micro_batch_size": 4}
    timed = base | ASYNC | {"train.checkpoint_interval": 0, "train.checkpoint_minutes": 0.25}
    runs = [
        {"overrides": tiny_overrides(demo_data, work, "sync", **base | EVERY_2)},
        {"overrides": tiny_overrides(demo_data, work, "async", **base | ASYNC)},
        {"overrides": tiny_overrides(demo_data, work, "timed", **timed), "clock_step_s": [1, 7]},
        {
            "overrides": tiny_overrides(demo_data, work, "fails", **base | ASYNC),
            "fail_write_at": {"step": 4, "rank": 1},
        },
    ]
    launch(2, runs, work / "job", expect_failure=True)  # the last run fails, as it should
    return {"work": work, "results": json.loads((work / "job" / "out.json").read_text())}


def test_two_ranks_async_and_timed_saves(two_ranks):
    """Background saves are hash-identical to synchronous ones over two ranks; with clocks that
    disagree (rank 0 reads 1 s per step, rank 1 7 s) and `checkpoint_minutes` = 15 s, both
    ranks save at rank 1's steps 3 and 6 (rank 0's clock alone would never have saved)."""
    work, (sync, background, _) = two_ranks["work"], two_ranks["results"]
    assert background["losses"] == sync["losses"]
    for n in (2, 4, 6, 7):
        name = f"step_{n:08d}"
        a, b = work / "sync" / "checkpoints" / name, work / "async" / "checkpoints" / name
        assert files(a) == files(b), name
        assert {"shards/rank-00000.safetensors", "shards/rank-00001.safetensors"} <= set(files(b))
    ckpts = work / "timed" / "checkpoints"
    assert steps_saved(ckpts) == [3, 6, 7]
    for n in (3, 6):
        shards = sorted(p.name for p in (ckpts / f"step_{n:08d}" / "shards").iterdir())
        assert shards == ["rank-00000.safetensors", "rank-00001.safetensors"]


def test_a_rank_whose_background_write_fails_stops_the_job(two_ranks):
    """Rank 1's write of step 4 fails: rank 0 (whose own write worked) raises a one-line error
    naming rank 1, nothing is sealed, and step 2 stays the latest, resumable."""
    work = two_ranks["work"]
    error = (work / "job" / "out.json.rank0").read_text()
    assert error.startswith("CheckpointError: ") and len(error.splitlines()) == 1
    assert "step 4 was not written: rank 1 failed writing its files" in error
    assert "Read-only file system" in error and "step_00000002 stays the latest" in error
    ckpts = work / "fails" / "checkpoints"
    assert steps_saved(ckpts) == [2] and (ckpts / "latest").read_text() == "step_00000002\n"
    assert CheckpointManager(ckpts, keep_last=4).resume_point() == (ckpts / "step_00000002", None)
    assert {"shards/rank-00000.safetensors", "shards/rank-00001.safetensors"} <= set(
        files(ckpts / "step_00000002")
    )
