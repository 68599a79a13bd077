"""Fault injection on checkpoints and runs: flipped bytes, truncations, shards swapped between
steps, planted files and pickles, a damaged or missing `latest`, SIGKILL at random moments,
concurrent trainers. Nothing is lost (a resume falls back to the newest checkpoint that verifies
and then equals the uninterrupted run), nothing is executed, and every error is one line naming
the file. Inputs (config, data, imports) are in test_faults_inputs.py, MLflow in
test_faults_tracking.py; docs/reliability.md maps each promise to its test."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, Planted, free_port, one_line_error, tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pretrain.checkpoint.format import CheckpointReader
from pretrain.checkpoint.manager import MARKER, CheckpointManager, read_latest, verify_checkpoint
from pretrain.checkpoint.marker import hash_file, write_marker
from pretrain.checkpoint.runlock import acquire_run_lock
from pretrain.config import load_config
from pretrain.errors import CheckpointError
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"
SHARD = "shards/rank-00000.safetensors"


@pytest.fixture(scope="module")
def base(runtime, demo_data, tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints at steps 4 and 8 (the reference)."""
    out = tmp_path_factory.mktemp("faults")
    result = train(load_config(TINY, tiny_overrides(demo_data, out, "base")))
    return {"run": out / "base", "losses": result.losses, "data": demo_data}


def copy_run(base, tmp_path: Path, name: str = "r") -> Path:
    """A copy of the reference run as `tmp_path/name`; returns its checkpoints directory."""
    shutil.copytree(base["run"], tmp_path / name)
    return tmp_path / name / "checkpoints"


def step(ckpts: Path, n: int) -> Path:
    return ckpts / f"step_{n:08d}"


# Each breaks step 8 (the one `latest` names) and returns what the error must say.
def flip_byte(ckpt: Path) -> str:
    data = bytearray((ckpt / SHARD).read_bytes())
    data[len(data) // 2] ^= 0x10
    (ckpt / SHARD).write_bytes(data)
    return f"'{SHARD}' does not match its content hash"


def truncate(ckpt: Path) -> str:
    size = (ckpt / SHARD).stat().st_size
    (ckpt / SHARD).write_bytes((ckpt / SHARD).read_bytes()[:-100])
    return f"'{SHARD}' has {size - 100} bytes"


def swap_shard_from_step_4(ckpt: Path) -> str:
    other = step(ckpt.parent, 4) / SHARD
    assert other.stat().st_size == (ckpt / SHARD).stat().st_size  # sizes cannot tell them apart
    shutil.copy(other, ckpt / SHARD)
    return f"'{SHARD}' does not match its content hash"


def plant_extra_shard(ckpt: Path) -> str:
    shutil.copy(ckpt / SHARD, ckpt / "shards" / "rank-00001.safetensors")
    return "'shards/rank-00001.safetensors' is not listed in COMPLETE.json"


def plant_pickle(ckpt: Path) -> str:
    (ckpt / "common.json").unlink()
    (ckpt / "common.pt").write_bytes(pickle.dumps(Planted(ckpt.parent / "executed")))
    return "'common.pt' is not listed in COMPLETE.json"


def delete_trainer_state(ckpt: Path) -> str:
    (ckpt / "trainer_rank_00000.json").unlink()
    return "'trainer_rank_00000.json' listed in COMPLETE.json is missing"


def garble_marker(ckpt: Path) -> str:
    (ckpt / MARKER).write_text('{"files": ')
    return "COMPLETE.json: unreadable marker"


FAULTS = [
    flip_byte,
    truncate,
    swap_shard_from_step_4,
    plant_extra_shard,
    plant_pickle,
    delete_trainer_state,
    garble_marker,
]


def test_marker_lists_every_file_with_its_size_and_hash(base):
    ckpt = step(base["run"] / "checkpoints", 8)
    marker = verify_checkpoint(ckpt)
    files = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {MARKER}
    assert set(marker["files"]) == files and marker["hash"] == "xxh3_128"
    for name, entry in marker["files"].items():
        assert entry == {"size": (ckpt / name).stat().st_size, "hash": hash_file(ckpt / name)}


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__ for f in FAULTS])
def test_a_damaged_latest_falls_back_to_the_newest_checkpoint_that_verifies(base, tmp_path, fault):
    ckpts = copy_run(base, tmp_path)
    expected = fault(step(ckpts, 8))
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        verify_checkpoint(step(ckpts, 8))
    path, note = CheckpointManager(ckpts, keep_last=3).resume_point()
    assert path == step(ckpts, 4)
    assert len(note.splitlines()) == 1 and expected in note and "step_00000008" in note
    assert "resuming from step_00000004 instead" in note
    assert not (ckpts / "executed").exists()


def test_sizes_alone_miss_a_swapped_shard(base, tmp_path):
    ckpts = copy_run(base, tmp_path)
    swap_shard_from_step_4(step(ckpts, 8))
    verify_checkpoint(step(ckpts, 8), hashes=False)  # what COMPLETE.json checked before hashes
    manager = CheckpointManager(ckpts, keep_last=3)
    assert manager.resume_point(verify=False) == (step(ckpts, 8), None)


def resumes_at_4_like_the_base(base, tmp_path, capsys, warning: str):
    """Train the copy `tmp_path/r`: one warning line containing `warning` and resuming from
    step 4, then steps 5-8 equal the uninterrupted run bit for bit. Returns the result."""
    capsys.readouterr()
    result = train(load_config(TINY, tiny_overrides(base["data"], tmp_path, "r")))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if warning in line]
    assert len(warnings) == 1 and "resuming from step_00000004 instead" in warnings[0], out
    assert "resumed at step 4" in out
    assert result.losses == {s: base["losses"][s] for s in (5, 6, 7, 8)}  # bit for bit
    return result


def test_resume_after_a_swapped_shard_equals_the_uninterrupted_run(base, tmp_path, capsys):
    copy_run(base, tmp_path)
    swap_shard_from_step_4(step(tmp_path / "r" / "checkpoints", 8))
    result = resumes_at_4_like_the_base(base, tmp_path, capsys, "fails verification")
    verify_checkpoint(result.checkpoint)  # step 8 written again, whole


def test_no_checkpoint_verifies_is_one_line_and_touches_nothing(base, tmp_path, capsys):
    ckpts = copy_run(base, tmp_path)
    flip_byte(step(ckpts, 8))
    truncate(step(ckpts, 4))
    before = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    err = one_line_error(capsys, ["train", str(TINY), *tiny_overrides(base["data"], tmp_path, "r")])
    assert "step_00000008" in err and "does not match its content hash" in err
    assert "no other checkpoint" in err
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before


def test_a_missing_latest_resumes_the_newest_checkpoint_that_verifies(base, tmp_path, capsys):
    """A kill between sealing a run's first checkpoint and writing `latest` leaves exactly this:
    step 4 complete, no pointer. The run resumes there (a fresh start would overwrite it) and
    then equals the uninterrupted run."""
    ckpts = copy_run(base, tmp_path)
    (ckpts / "latest").unlink()
    shutil.rmtree(step(ckpts, 8))
    resumes_at_4_like_the_base(base, tmp_path, capsys, "no 'latest' pointer")
    assert read_latest(ckpts) == "step_00000008"


def test_a_missing_latest_skips_a_damaged_newest_and_refuses_when_none_verifies(base, tmp_path):
    ckpts = copy_run(base, tmp_path)
    (ckpts / "latest").unlink()
    flip_byte(step(ckpts, 8))
    path, note = CheckpointManager(ckpts, keep_last=3).resume_point()
    assert path == step(ckpts, 4) and "no 'latest' pointer" in note, note
    truncate(step(ckpts, 4))
    before = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies \\(2 complete\\)"):
        CheckpointManager(ckpts, keep_last=3).resume_point()
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before


@pytest.mark.parametrize(
    "content", ["../other/step_00000004", "/tmp/step_00000004", "step_00000004/..", "x" * 5000]
)
def test_latest_must_name_a_step_directory_inside_the_checkpoints(base, tmp_path, content):
    ckpts = copy_run(base, tmp_path)
    (ckpts / "latest").write_text(content)
    with pytest.raises(CheckpointError, match=r"latest: names .*expected the name of a step_"):
        CheckpointManager(ckpts, keep_last=3).resume_point()


def test_a_latest_link_out_of_the_checkpoints_is_refused(base, tmp_path):
    ckpts = copy_run(base, tmp_path)
    shutil.copytree(step(ckpts, 4), tmp_path / "step_00000004")
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to(tmp_path / "step_00000004")
    with pytest.raises(CheckpointError, match=r"latest: links to .* expected a step_\w+ directory"):
        read_latest(ckpts)


def test_markers_without_hashes_verify_by_size_and_say_so(base, tmp_path):
    ckpts = copy_run(base, tmp_path)
    marker_path = step(ckpts, 8) / MARKER
    marker = json.loads(marker_path.read_text())
    legacy = {"step": 8, "files": {n: e["size"] for n, e in marker["files"].items()}}
    marker_path.write_text(json.dumps(legacy))  # as written before hashes
    verify_checkpoint(step(ckpts, 8))
    path, note = CheckpointManager(ckpts, keep_last=3).resume_point()
    assert path == step(ckpts, 8) and "no content hashes" in note and "sizes only" in note


def test_a_resealed_planted_pickle_is_refused_on_resume_and_never_runs(base, tmp_path, capsys):
    """The attacker also rewrites COMPLETE.json: verification passes, the loader refuses."""
    ckpts = copy_run(base, tmp_path)
    plant_pickle(step(ckpts, 8))
    write_marker(step(ckpts, 8), 8)
    err = one_line_error(capsys, ["train", str(TINY), *tiny_overrides(base["data"], tmp_path, "r")])
    assert "common.pt: refused to load" in err
    assert not (ckpts / "executed").exists()


def _reseal_with(ckpt: Path, change) -> None:
    tensors = load_file(ckpt / SHARD)
    with safe_open(str(ckpt / SHARD), "pt") as f:
        metadata = f.metadata()
    change(tensors)
    save_file(tensors, str(ckpt / SHARD), metadata=metadata)
    write_marker(ckpt, 8)


def test_nan_weights_are_refused_naming_the_tensor(base, tmp_path, capsys):
    ckpts = copy_run(base, tmp_path)
    name = "head.final_norm.weight#param"
    _reseal_with(step(ckpts, 8), lambda t: t[name].__setitem__(0, float("nan")))
    err = one_line_error(capsys, ["train", str(TINY), *tiny_overrides(base["data"], tmp_path, "r")])
    assert "'head.final_norm.weight' (param) holds NaN or infinite values" in err


@pytest.mark.parametrize("command", ["export", "convert", "generate", "train"])
def test_a_corrupt_safetensors_header_is_one_line_naming_the_file(base, tmp_path, capsys, command):
    ckpts = copy_run(base, tmp_path)
    ckpt = step(ckpts, 8)
    data = bytearray((ckpt / SHARD).read_bytes())
    data[8:16] = b"{garbage"  # the JSON header starts at byte 8
    (ckpt / SHARD).write_bytes(data)
    write_marker(ckpt, 8)  # sealed as it is: only the reader can notice
    argv = {
        "export": ["export", str(ckpt), str(tmp_path / "hf"), "--data", str(base["data"])],
        "convert": ["ckpt", "convert", str(ckpt), "--out", str(tmp_path / "c"), "--tp", "1"]
        + ["--pp", "1"],
        "generate": ["generate", str(ckpt), "--prompt", "the"],
        "train": ["train", str(TINY), *tiny_overrides(base["data"], tmp_path, "r")],
    }[command]
    err = one_line_error(capsys, argv)
    assert f"{ckpt / SHARD}: not a readable safetensors file" in err


def test_readers_verify_hashes_unless_told_not_to(base, tmp_path, capsys):
    ckpts = copy_run(base, tmp_path)
    swap_shard_from_step_4(step(ckpts, 8))
    convert = ["ckpt", "convert", str(step(ckpts, 8)), "--out", str(tmp_path / "c")]
    convert += ["--tp", "1", "--pp", "1"]
    for argv in (
        convert,
        ["export", str(step(ckpts, 8)), str(tmp_path / "hf"), "--data", str(base["data"])],
        ["generate", str(step(ckpts, 8)), "--prompt", "the"],
    ):
        err = one_line_error(capsys, argv)
        assert f"'{SHARD}' does not match its content hash" in err
    from launcher.cli import main as dlm

    assert dlm([*convert, "--no-verify"]) == 0  # the user's call: sizes only
    assert (tmp_path / "c" / "step_00000008" / MARKER).is_file()


def test_prune_removes_only_its_own_or_provably_stale_directories(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for n in (1, 2, 3, 9):
        step(ckpts, n).mkdir(parents=True)
        (step(ckpts, n) / "x").write_text(str(n))
        write_marker(step(ckpts, n), n)
    for suffix in ("mine", "someone-else"):
        (ckpts / f"step_00000004.partial.{suffix}").mkdir()
    manager = CheckpointManager(ckpts, keep_last=1)
    manager._token, manager._saved = "mine", {step(ckpts, 3)}  # as after its own save of step 3
    manager._prune(keep=step(ckpts, 3))  # no run lock: another trainer may own the rest
    left = sorted(p.name for p in ckpts.iterdir())
    assert left == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
        "step_00000004.partial.someone-else",
        "step_00000009",
    ]
    with acquire_run_lock(tmp_path / "run", 0):  # now nobody else can be writing here
        manager._prune(keep=step(ckpts, 3))
    # older ones beyond keep_last and the foreign staging are stale; the newer step 9 is kept
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000003", "step_00000009"]


def test_a_kill_inside_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """An old checkpoint is renamed out of the `step_XXXXXXXX` names before it is deleted: a
    kill inside the deletion (here: the deletion never runs) leaves only a stale `.pruned`
    directory, which nothing lists as a checkpoint and the next save under the lock removes."""
    import pretrain.checkpoint.manager as manager_module

    ckpts = tmp_path / "run" / "checkpoints"
    for n in (1, 2):
        step(ckpts, n).mkdir(parents=True)
        (step(ckpts, n) / "x").write_text(str(n))
        write_marker(step(ckpts, n), n)
    manager = CheckpointManager(ckpts, keep_last=1)
    with acquire_run_lock(tmp_path / "run", 0):
        real_rmtree = shutil.rmtree
        monkeypatch.setattr(manager_module.shutil, "rmtree", lambda *a, **k: None)
        manager._prune(keep=step(ckpts, 2))
        (pruned,) = [p.name for p in ckpts.iterdir() if p.name.startswith("step_00000001")]
        assert pruned.startswith("step_00000001.pruned.")
        assert manager.complete_checkpoints() == [step(ckpts, 2)]
        monkeypatch.setattr(manager_module.shutil, "rmtree", real_rmtree)
        manager._prune(keep=step(ckpts, 2))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]


HOLD = """
import sys, time
from pretrain.checkpoint.runlock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1], 0)
print("locked", flush=True)
time.sleep(600)
"""


def test_the_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError) as info:
            acquire_run_lock(tmp_path / "run", 0)
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "host " in message and "started 20" in message
        assert message.startswith(f"{(tmp_path / 'run').resolve()}: another trainer")
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    acquire_run_lock(tmp_path / "run", 0).release()


def _lock_worker(rank: int, port: int, run_dir: str, ckpts: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        try:
            acquire_run_lock(run_dir, rank)
            locked = "locked"
        except CheckpointError as exc:
            locked = str(exc)
        path, note = CheckpointManager(Path(ckpts), keep_last=3, rank=rank).resume_point()
        queue.put((rank, locked, str(path), note))
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_on_the_lock_and_on_the_fallback(base, tmp_path):
    """Collective: rank 0 locks and lists, every rank hashes its share of the files, and both
    ranks get the same answers (here: the lock is held elsewhere, step 8 is damaged)."""
    import torch.multiprocessing as mp

    ckpts = copy_run(base, tmp_path)
    flip_byte(step(ckpts, 8))
    held = acquire_run_lock(tmp_path / "r", 0)  # this process plays the other trainer
    try:
        ctx = mp.get_context("spawn")
        queue, port = ctx.Queue(), free_port()
        args = (port, str(tmp_path / "r"), str(ckpts), queue)
        procs = [ctx.Process(target=_lock_worker, args=(r, *args)) for r in range(2)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    finally:
        held.release()
    (_, lock0, path0, note0), (_, lock1, path1, note1) = results
    assert lock0 == lock1 and "another trainer is running this run" in lock0
    assert path0 == path1 == str(step(ckpts, 4)) and note0 == note1
    assert f"'{SHARD}' does not match its content hash" in note0


def dlm_train(overrides: list[str]) -> subprocess.Popen:
    """`dlm train` in a process of its own (not part of this process's distributed world)."""
    world = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in world}
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "train", str(TINY), *overrides],
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_second_trainer_on_the_same_run_fails_at_once(base, tmp_path, capsys):
    overrides = tiny_overrides(base["data"], tmp_path, "busy", **{"train.steps": 100000})
    first = dlm_train([*overrides, "train.checkpoint_interval=0"])
    try:
        seen = []
        for line in first.stdout:
            seen.append(line)
            if line.startswith("[dlm] step "):
                break
        else:
            raise AssertionError("the first trainer did not start:\n" + "".join(seen)[-3000:])
        started = time.monotonic()
        err = one_line_error(capsys, ["train", str(TINY), *overrides])
        assert time.monotonic() - started < 60
        assert "another trainer is running this run" in err and f"pid {first.pid}" in err
    finally:
        first.kill()
        first.wait()


def _killed_until_done(overrides: list[str], kills: int, seed: int) -> list[str]:
    """Run `dlm train` to the end, SIGKILLing it `kills` times at random moments (most of the
    time inside a save: there is one every step). Returns every attempt's output."""
    rng, logs = random.Random(seed), []
    while True:
        proc = dlm_train(overrides)
        seen = []
        if len(logs) < kills:
            wanted, steps = rng.randint(1, 3), 0
            for line in proc.stdout:
                seen.append(line)
                steps += bool(re.match(r"\[dlm\] step \d+/", line))
                if steps >= wanted:
                    break
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=600)
        logs.append("".join(seen) + rest)
        if proc.returncode == 0:
            return logs
        assert proc.returncode == -signal.SIGKILL and len(logs) <= kills, logs[-1][-3000:]


def _check_killed_runs(base, tmp_path, kills: int, seed: int, background: bool = False) -> None:
    extra = {"train.steps": 10, "train.checkpoint_interval": 1, "train.keep_last": 2}
    extra["train.log_interval"] = 1
    reference = train(load_config(TINY, tiny_overrides(base["data"], tmp_path, "ref", **extra)))
    extra["train.checkpoint_async"] = background  # against the synchronous reference
    overrides = tiny_overrides(base["data"], tmp_path, "killed", **extra)
    logs = _killed_until_done(overrides, kills, seed)
    sealed = 0  # the newest checkpoint any attempt reported complete
    for log in logs:
        resumed = re.search(r"resumed at step (\d+)", log)
        assert (int(resumed.group(1)) if resumed else 0) >= sealed, log[-3000:]  # none lost
        sealed = max([sealed, *map(int, re.findall(r"\[dlm\] step (\d+) checkpoint", log))])
    got = CheckpointReader(tmp_path / "killed" / "checkpoints" / "step_00000010")
    want = CheckpointReader(reference.checkpoint)
    for name in want.names():
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got.full(name, kind), want.full(name, kind)), (name, kind)
    assert got.common == want.common


def test_random_sigkills_during_training_and_saves_lose_nothing(base, tmp_path):
    _check_killed_runs(base, tmp_path, kills=2, seed=0)


@pytest.mark.slow
def test_many_random_sigkills_lose_nothing(base, tmp_path):
    _check_killed_runs(base, tmp_path, kills=8, seed=1)


@pytest.mark.slow
def test_random_sigkills_with_background_saves_lose_nothing(base, tmp_path):
    """As above with `train.checkpoint_async`: most kills land while a save is being written
    on the background thread (one is in flight almost all the time)."""
    _check_killed_runs(base, tmp_path, kills=4, seed=2, background=True)
