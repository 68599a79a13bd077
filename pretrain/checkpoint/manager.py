"""Crash-safe, sharded checkpoints: every rank writes its shard, rank 0 seals the checkpoint.

Layout of `<run>/checkpoints/`:

    step_00000200/            a complete checkpoint (never modified after it appears)
        shards/rank-*.safetensors, common.json, trainer_rank_*.json   see `format.py`
        config.yaml                                               the resolved run config
        COMPLETE.json                                             marker: step + every file's size
    latest                    text file naming the newest complete checkpoint

A save writes everything into `step_X.partial/`, then rank 0 writes the marker, renames the
directory to `step_X` (atomic on POSIX) and only then replaces `latest` (write + os.replace). A
crash at any point leaves the previous checkpoint and `latest` untouched; a leftover `.partial`
directory is ignored and removed by the next save. Loading checks the marker and the file sizes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from pretrain.checkpoint.format import (
    COMMON,
    KINDS,
    CheckpointReader,
    canonical_names,
    capture_rank_shard,
    legacy_trainer_state_file,
    load_weights,
    trainer_state_file,
    write_rank_shard,
)
from pretrain.checkpoint.optim_state import (
    get_step,
    prepare_for_restore,
    set_lr_schedule,
    set_param_state,
    set_step,
)
from pretrain.checkpoint.records import read_record, write_record
from pretrain.errors import CheckpointError

MARKER = "COMPLETE.json"
LATEST = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, directory: str | Path, *, keep_last: int, rank: int = 0):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank

    # ------------------------------------------------------------------ queries
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if p.is_dir() and p.name.startswith("step_") and (p / MARKER).is_file()
        ]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, verified complete; None when there is none yet."""
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        verify_checkpoint(path)
        return path

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, *, trainer_state: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint directory."""
        rt = engine.rt
        tag = _tag(step)
        staging = self.directory / f"{tag}.partial"
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
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
            _atomic_write_text(self.directory / LATEST, tag + "\n")
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        complete = self.complete_checkpoints()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)


def seal(staging: Path, final: Path, step: int, config_yaml: str) -> None:
    """Write config + marker into a fully written staging directory and move it into place."""
    (staging / "config.yaml").write_text(config_yaml)
    files = {
        str(p.relative_to(staging)): p.stat().st_size
        for p in sorted(staging.rglob("*"))
        if p.is_file()
    }
    _atomic_write_text(staging / MARKER, json.dumps({"step": step, "files": files}))
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = final.with_name(final.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)


# ---------------------------------------------------------------------- load
def open_checkpoint(path: Path, *, num_layers: int) -> CheckpointReader:
    """Verify a checkpoint and index its shards; it must hold exactly this model's parameters."""
    verify_checkpoint(path)
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


def verify_checkpoint(path: Path) -> dict:
    """Check that `path` is a complete checkpoint: marker present, every listed file intact."""
    marker_path = path / MARKER
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not marker_path.is_file():
        raise CheckpointError(
            f"{path}: incomplete checkpoint (no {MARKER}; the save was interrupted)"
        )
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(
            f"{marker_path}: unreadable marker (expected step and files)"
        ) from None
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file '{name}' listed in {MARKER} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{path}: file '{name}' has {f.stat().st_size} bytes, {MARKER} says {size}"
            )
    return marker
