"""Crash-safe, sharded, verified checkpoints: every rank writes its shard, rank 0 seals them.

Layout of `<run>/checkpoints/`:

    step_00000200/            a complete checkpoint (never modified after it appears)
        shards/rank-*.safetensors, common.json, trainer_rank_*.json   see `format.py`
        config.yaml                                               the resolved run config
        COMPLETE.json                                             marker: step, every file's
                                                                  size and content hash
    latest                    text file naming the newest complete checkpoint (`step_*`)

A save writes everything into `step_X.partial.<token>/` (a name no other process uses), each
rank hashes the files it wrote, then rank 0 writes the marker, renames the directory to `step_X`
(atomic on POSIX) and only then replaces `latest` (unique temporary file + os.replace). A crash
at any point leaves the previous checkpoint and `latest` untouched. Loading verifies the marker,
the file set, sizes and hashes (`marker.py`); `resume_point` falls back to the newest checkpoint
that verifies when `latest` does not, or is missing (a crash between the rename and the
pointer). Pruning removes only what this process wrote, or anything stale while this process
holds the run lock (`runlock.py`): no other trainer can be writing then.

With `background` (`train.checkpoint_async`) the same writes, hashes, seal and pruning run on a
thread after a host snapshot taken on the training step (`background.py`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint.background import BackgroundWrite, HostBuffers
from pretrain.checkpoint.format import (
    COMMON,
    KINDS,
    SHARD_DIR,
    CheckpointReader,
    canonical_names,
    capture_rank_shard,
    check_finite,
    legacy_trainer_state_file,
    load_weights,
    shard_file,
    to_host,
    trainer_state_file,
    write_rank_shard,
)
from pretrain.checkpoint.marker import (
    MARKER,
    STEP_DIR,
    atomic_write_text,
    is_hashed,
    record_digests,
    verify_checkpoint,
    write_marker,
)
from pretrain.checkpoint.optim_state import (
    get_step,
    prepare_for_restore,
    set_lr_schedule,
    set_param_state,
    set_step,
)
from pretrain.checkpoint.records import encode_record, read_record, write_encoded
from pretrain.checkpoint.runlock import holds_run_lock
from pretrain.errors import CheckpointError

__all__ = ["MARKER", "LATEST", "CheckpointManager", "read_latest", "seal", "verify_checkpoint"]

LATEST = "latest"


def _world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) without it."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(value):
    """`value` as rank 0 has it, on every rank (collective; a no-op for a world of one)."""
    if _world()[1] > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _nothing() -> None:
    pass


@dataclass
class _Snapshot:
    """What a save writes, taken on the training thread (`CheckpointManager._snapshot`)."""

    step: int
    staging: Path
    final: Path
    tensors: dict  # "<name>#<kind>" -> fp32 CPU tensor (host buffers under `background`)
    meta: dict
    records: dict[str, str]  # file name -> JSON text
    config_yaml: str
    ready: Callable[[], None]  # called before the tensors are read (device-to-host copies)


def read_latest(directory: Path) -> str | None:
    """The checkpoint name `directory/latest` holds, None without one. It must name a
    `step_XXXXXXXX` directory inside `directory` (a symbolic link must point at one there)."""
    pointer = directory / LATEST
    if pointer.is_symlink():
        target = pointer.resolve()
        if target.parent != directory.resolve() or not STEP_DIR.fullmatch(target.name):
            raise CheckpointError(
                f"{pointer}: links to {str(target)[:120]}; expected a step_XXXXXXXX directory "
                f"inside {directory}"
            )
        return target.name
    if not pointer.exists():
        return None
    with open(pointer, "rb") as f:
        raw = f.read(257)
    name = raw.decode("utf-8", "replace").strip()
    if len(raw) > 256 or not STEP_DIR.fullmatch(name):
        raise CheckpointError(
            f"{pointer}: names {name[:60]!r}; expected the name of a step_XXXXXXXX directory "
            f"inside {directory} (no path)"
        )
    return name


class CheckpointManager:
    def __init__(
        self, directory: str | Path, *, keep_last: int, rank: int = 0, background: bool = False
    ):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.background = background
        """Write checkpoints on a background thread (`train.checkpoint_async`)."""
        self._token: str | None = None  # this process's staging suffix, agreed at the 1st save
        self._saved: set[Path] = set()  # checkpoints this manager sealed (its to prune)
        self._group = None  # gloo group the writers exchange their outcomes over
        self._writer = BackgroundWrite()
        self._host = HostBuffers()
        self._notes: deque[str] = deque()  # completed saves, for poll(); appended by writers

    # ------------------------------------------------------------------ queries
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints (`step_XXXXXXXX` with a marker), oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if STEP_DIR.fullmatch(p.name) and p.is_dir() and (p / MARKER).is_file()
        ]
        return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, verified (hashes included); None when there is none."""
        name = read_latest(self.directory)
        if name is None:
            return None
        verify_checkpoint(self.directory / name)
        return self.directory / name

    def resume_point(self, *, verify: bool = True) -> tuple[Path | None, str | None]:
        """(checkpoint to resume, one-line note or None); (None, None) for a fresh start.

        Collective under torch.distributed (every rank calls it, and all get the same answer):
        rank 0 reads `latest` and lists the checkpoints, every rank hashes its share of the
        files. The checkpoint `latest` names is used when it verifies; otherwise the newest
        checkpoint that does, and the note says so. Without `latest` beside complete
        checkpoints (a save killed between sealing its directory and writing the pointer, e.g.
        the run's first save) the newest that verifies, with a note: a fresh start would
        overwrite them. Raises `CheckpointError` when checkpoints exist but none verifies, or
        when `latest` is invalid.
        """
        rank, world = _world()
        listing = None
        if rank == 0:
            try:
                names = [p.name for p in self.complete_checkpoints()]
                listing = (read_latest(self.directory), names, None)
            except CheckpointError as exc:
                listing = (None, [], str(exc))
        latest, names, error = _from_rank0(listing)
        if error:
            raise CheckpointError(error)
        if latest is None and not names:
            return None, None
        if latest is None:  # a save stopped between sealing a checkpoint and writing `latest`
            failure = f"{self.directory}: has no '{LATEST}' pointer"
        else:
            target = self.directory / latest
            failure, hashed = self._check(target, verify, rank, world)
            if failure is None:
                return target, None if hashed or not verify else _size_only(target)
        for name in reversed(names):
            candidate = self.directory / name
            if name == latest:
                continue
            problem, hashed = self._check(candidate, verify, rank, world)
            if problem is None:
                extra = "" if hashed or not verify else " (it has no content hashes: sizes only)"
                why = (
                    f"the latest checkpoint fails verification: {failure}"
                    if latest is not None
                    else f"{failure} (a save stopped between sealing {names[-1]} and writing "
                    "it, or it was removed)"
                )
                return candidate, (
                    f"[dlm] warning: {why}; resuming from {name} instead, the newest "
                    f"checkpoint that verifies{extra}"
                )
        raise CheckpointError(
            f"{failure}; {'no' if latest is None else 'no other'} checkpoint in "
            f"{self.directory} verifies ({len(names)} "
            f"complete); restore the files, or remove {self.directory / LATEST} and the "
            "checkpoints to start over"
        )

    @staticmethod
    def _check(path: Path, verify: bool, rank: int, world: int) -> tuple[str | None, bool]:
        """(first failure on any rank or None, whether the marker has hashes). Collective."""
        try:
            marker = verify_checkpoint(path, hashes=verify, share=(rank, world))
            mine = (None, is_hashed(marker))
        except CheckpointError as exc:
            mine = (str(exc), False)
        except OSError as exc:  # unreadable (permissions, I/O error): as good as damaged
            mine = (f"{path}: {exc.strerror or exc} ({exc.filename})", False)
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            failures = [f for f, _ in everyone if f is not None]
            return (failures[0] if failures else None), all(h for _, h in everyone)
        return mine

    # ------------------------------------------------------------------ save
    def save(
        self, engine, step: int, *, trainer_state: dict, config_yaml: str, wait: bool = True
    ) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory, complete on
        return unless `background` is set and `wait` is False: then only the snapshot was taken
        (see `background.py`) and `poll()` reports the save once it is complete."""
        if self._writer.busy:  # at most one save in flight: this one waits for it
            what = self._writer.what
            waited = self._writer.wait()
            self._notes.append(
                f"[dlm] step {step}: waited {waited:.2f} s for {what} to finish writing"
            )
        started = time.perf_counter()
        snap = self._snapshot(engine, step, trainer_state, config_yaml)
        if self.background and not wait:
            blocked = time.perf_counter() - started
            self._writer.submit(lambda: self._write(snap, blocked), snap.final.name)
        else:
            self._write(snap, None)
        return snap.final

    def poll(self) -> list[str]:
        """One line per save completed since the last call; raises the failure of a background
        save (on every rank: the ranks exchange their outcomes). Not collective: call it at
        every step."""
        self._writer.check()
        return [self._notes.popleft() for _ in range(len(self._notes))]

    def wait(self) -> None:
        """Wait for the save in flight, if any; raises its failure."""
        self._writer.wait()

    def close(self) -> None:
        """Wait for the save in flight before the run ends (the run lock must outlive it). A
        failure is printed, not raised: `close` runs while another exception may be leaving."""
        try:
            self._writer.wait()
        except Exception as exc:  # noqa: BLE001 - reported, and the checkpoint stays partial
            print(f"[dlm] error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)

    def _snapshot(self, engine, step: int, trainer_state: dict, config_yaml: str) -> _Snapshot:
        """The training-thread half of a save: staging directory, DP gathers, host copies."""
        rt = engine.rt
        tag = _tag(step)
        if self._token is None:  # unique per process: two trainers never share a staging dir
            self._token = _from_rank0(f"{os.getpid()}-{secrets.token_hex(4)}")
        if self._group is None and _world()[1] > 1:  # the writers' own (host) process group
            self._group = dist.new_group(backend="gloo")
        staging = self.directory / f"{tag}.partial.{self._token}"
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # ours, from a save that failed
            staging.mkdir(parents=True)
        _barrier()
        tensors, meta = capture_rank_shard(
            engine.ds,
            engine.canonical_parameters(),
            dp_rank=rt.dp_rank,
            dp_size=rt.dp,
            tp_rank=rt.topology.coordinates(rt.rank)[2],
            tp_size=rt.tp,
            expert_dp=(rt.topology.expert_coordinates(rt.rank)[1], rt.dp // rt.ep),
            buffers=engine.canonical_buffers(),
            host=self._host.copy if self.background else to_host,
        )
        records = {trainer_state_file(self.rank): trainer_state}
        if self.rank == 0:
            records[COMMON] = {
                "step": step,
                "optimizer_step": get_step(engine.ds),
                "scheduler": engine.ds.lr_scheduler.state_dict(),
                "layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp}
                | ({"ep": rt.ep} if rt.ep > 1 else {}),
            }
        return _Snapshot(
            step=step,
            staging=staging,
            final=self.directory / tag,
            tensors=tensors,
            meta=meta,
            records={name: encode_record(value, name) for name, value in records.items()},
            config_yaml=config_yaml,
            ready=self._host.ready() if self.background else _nothing,
        )

    def _write(self, snap: _Snapshot, blocked: float | None) -> None:
        """The rest of a save, on the training thread or a background one (`blocked`: how
        long the step was held by the snapshot). The ranks exchange their outcomes before rank
        0 seals and after: a failure anywhere is raised on every rank, and never sealed."""
        started = time.perf_counter()
        failure = None
        try:
            snap.ready()  # device-to-host copies landed
            write_rank_shard(snap.staging, self.rank, snap.tensors, snap.meta)
            for name, text in snap.records.items():
                write_encoded(snap.staging / name, text)
            written = [f"{SHARD_DIR}/{shard_file(self.rank)}", *snap.records]
            record_digests(snap.staging, self.rank, written)
        except Exception as exc:  # noqa: BLE001 - every rank learns of it in _agree
            failure = exc
        self._agree(snap, failure, "writing its files")
        if self.rank == 0:
            try:
                seal(snap.staging, snap.final, snap.step, snap.config_yaml)
                self._saved.add(snap.final)
                atomic_write_text(self.directory / LATEST, snap.final.name + "\n")
                self._prune(keep=snap.final)
            except Exception as exc:  # noqa: BLE001
                failure = exc
        self._agree(snap, failure, "sealing")
        note = f"[dlm] step {snap.step} checkpoint {snap.final}"
        if blocked is not None:
            note += (
                f" (the step waited {blocked:.2f} s for the snapshot; written in the "
                f"background in {time.perf_counter() - started:.2f} s)"
            )
        self._notes.append(note)

    def _agree(self, snap: _Snapshot, failure: Exception | None, doing: str) -> None:
        """Raise on every rank if any rank failed (`doing` what), naming it; a rank's own
        failure other than an I/O error is raised as it is (a bug keeps its traceback)."""
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        outcomes = [mine]
        if _world()[1] > 1:
            outcomes = [None] * _world()[1]
            dist.all_gather_object(outcomes, mine, group=self._group)
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if not failed:
            return
        if failure is not None and not isinstance(failure, OSError | CheckpointError):
            failure.add_note(f"while saving {snap.final}")
            raise failure
        rank, what = failed[0]
        what = " ".join(what.split())[:300]
        try:
            latest = read_latest(self.directory) or "no checkpoint"
        except CheckpointError:
            latest = "the previous 'latest'"
        if (snap.final / MARKER).is_file() and not snap.staging.exists():  # e.g. `latest` failed
            raise CheckpointError(
                f"{snap.final}: the checkpoint of step {snap.step} is complete, but rank {rank} "
                f"failed {doing} ({what}); {latest} is the latest"
            ) from failure
        raise CheckpointError(
            f"{snap.staging}: the checkpoint of step {snap.step} was not written: rank {rank} "
            f"failed {doing} ({what}); nothing was sealed, {latest} stays the latest"
        ) from failure

    def _prune(self, keep: Path) -> None:
        """Old checkpoints beyond `keep_last` and leftover staging directories: only those
        this manager wrote, unless this process holds the run lock (then no other trainer can
        be writing here, and whatever is left over is stale). Never anything newer than `keep`."""
        locked = holds_run_lock(self.directory.parent)
        complete = self.complete_checkpoints()
        step = int(keep.name.removeprefix("step_"))
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            newer = int(old.name.removeprefix("step_")) >= step
            if old != keep and not newer and (locked or old in self._saved):
                # renamed first (atomic): a kill inside the rmtree leaves no half-deleted
                # directory under a checkpoint's name, only a stale `.pruned` one
                gone = old.with_name(f"{old.name}.pruned.{secrets.token_hex(4)}")
                try:
                    os.replace(old, gone)
                except FileNotFoundError:  # removed by someone else meanwhile
                    continue
                shutil.rmtree(gone, ignore_errors=True)
        for stale in self.directory.glob("step_*.partial*"):
            if locked or stale.name.endswith(f".partial.{self._token}"):
                shutil.rmtree(stale, ignore_errors=True)
        if locked:
            for pattern in ("step_*.replaced*", "step_*.pruned*"):
                for stale in self.directory.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)


def _size_only(path: Path) -> str:
    return (
        f"[dlm] note: {path / MARKER} has no content hashes (written before they existed): "
        "verified by file sizes only"
    )


def seal(staging: Path, final: Path, step: int, config_yaml: str) -> None:
    """Write config + marker into a fully written staging directory and move it into place."""
    (staging / "config.yaml").write_text(config_yaml)
    write_marker(staging, step)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = final.with_name(f"{final.name}.replaced.{secrets.token_hex(4)}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)


# ---------------------------------------------------------------------- load
def open_checkpoint(path: Path, *, model, verify: bool = True) -> CheckpointReader:
    """Verify a checkpoint and index its shards; it must hold exactly this model's parameters.
    `verify=False` skips the content hashes (the file set and sizes are always checked), e.g.
    for a checkpoint that `CheckpointManager.resume_point` has just verified."""
    verify_checkpoint(path, hashes=verify)
    reader = CheckpointReader(path)
    reader.check_matches(canonical_names(model))
    return reader


def weight_loader(reader: CheckpointReader, *, tp_rank: int, tp_size: int):
    """`load_weights` callback for `build_engine`: fills parameters before DeepSpeed wraps them."""
    return lambda named: load_weights(reader, named, tp_rank=tp_rank, tp_size=tp_size)


def restore_optimizer(engine, reader: CheckpointReader, *, tp_rank: int, tp_size: int) -> None:
    """Master weights, Adam moments, step count and LR schedule into a freshly built engine."""
    prepare_for_restore(engine.ds)
    for name, param in engine.canonical_parameters():
        values = {kind: reader.local(name, kind, tp_rank, tp_size) for kind in KINDS}
        for kind, value in values.items():
            check_finite(reader, name, kind, value)
        set_param_state(engine.ds, param, values)
    with torch.no_grad():  # the routers' expert biases
        for name, buffer in engine.canonical_buffers():
            buffer.copy_(reader.local(name, "param", tp_rank, tp_size))
    set_step(engine.ds, reader.common["optimizer_step"])
    set_lr_schedule(engine.ds, reader.common["scheduler"])
    engine.ds.global_steps = reader.common["step"]


def load_trainer_state(path: Path, rank: int) -> dict:
    """This rank's trainer state. A rank that did not exist when the checkpoint was written (the
    data-parallel size grew) takes rank 0's: the data position is global, and the only other
    per-rank state (the CPU RNG) does not drive anything that must match across ranks."""
    for r in (rank, 0):
        if (path / trainer_state_file(r)).is_file() or (
            path / legacy_trainer_state_file(r)
        ).is_file():
            return read_record(
                path / trainer_state_file(r), legacy=path / legacy_trainer_state_file(r)
            )
    raise CheckpointError(f"{path}: no {trainer_state_file(0)} (trainer state)")
