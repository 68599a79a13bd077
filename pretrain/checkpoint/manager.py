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
that verifies when `latest` does not. Pruning removes only what this process wrote, or anything
stale while this process holds the run lock (`runlock.py`): no other trainer can be writing then.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import torch.distributed as dist

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
from pretrain.checkpoint.records import read_record, write_record
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
    def __init__(self, directory: str | Path, *, keep_last: int, rank: int = 0):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self._token: str | None = None  # this process's staging suffix, agreed at the 1st save
        self._saved: set[Path] = set()  # checkpoints this manager sealed (its to prune)

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
        checkpoint that does, and the note says so. Raises `CheckpointError` when checkpoints
        exist but none verifies, or when `latest` is missing or invalid beside complete
        checkpoints (a fresh start would overwrite them).
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
        if latest is None:
            if names:
                raise CheckpointError(
                    f"{self.directory}: holds complete checkpoints ({names[0]} .. {names[-1]}) "
                    f"but no '{LATEST}' pointer, and a fresh start would overwrite them; to "
                    f"resume, write a checkpoint's name into {self.directory / LATEST} (e.g. "
                    f"{names[-1]}); to start over, move {self.directory} away or choose "
                    "another run.name"
                )
            return None, None
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
                return candidate, (
                    f"[dlm] warning: the latest checkpoint fails verification: {failure}; "
                    f"resuming from {name} instead, the newest checkpoint that verifies{extra}"
                )
        raise CheckpointError(
            f"{failure}; no other checkpoint in {self.directory} verifies ({len(names)} "
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
    def save(self, engine, step: int, *, trainer_state: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint directory."""
        rt = engine.rt
        tag = _tag(step)
        if self._token is None:  # unique per process: two trainers never share a staging dir
            self._token = _from_rank0(f"{os.getpid()}-{secrets.token_hex(4)}")
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
        )
        write_rank_shard(staging, self.rank, tensors, meta)
        write_record(staging / trainer_state_file(self.rank), trainer_state)
        record_digests(
            staging,
            self.rank,
            [f"{SHARD_DIR}/{shard_file(self.rank)}", trainer_state_file(self.rank)],
        )
        if self.rank == 0:
            common = {
                "step": step,
                "optimizer_step": get_step(engine.ds),
                "scheduler": engine.ds.lr_scheduler.state_dict(),
                "layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp},
            }
            write_record(staging / COMMON, common)
        _barrier()
        final = self.directory / tag
        if self.rank == 0:
            seal(staging, final, step, config_yaml)
            self._saved.add(final)
            atomic_write_text(self.directory / LATEST, tag + "\n")
            self._prune(keep=final)
        _barrier()
        return final

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
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob("step_*.partial*"):
            if locked or stale.name.endswith(f".partial.{self._token}"):
                shutil.rmtree(stale, ignore_errors=True)
        if locked:
            for stale in self.directory.glob("step_*.replaced*"):
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
def open_checkpoint(path: Path, *, num_layers: int, verify: bool = True) -> CheckpointReader:
    """Verify a checkpoint and index its shards; it must hold exactly this model's parameters.
    `verify=False` skips the content hashes (the file set and sizes are always checked), e.g.
    for a checkpoint that `CheckpointManager.resume_point` has just verified."""
    verify_checkpoint(path, hashes=verify)
    reader = CheckpointReader(path)
    reader.check_matches(canonical_names(num_layers))
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
