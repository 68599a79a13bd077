"""Crash-safe checkpoints on top of DeepSpeed's per-rank checkpoint files.

Layout of `<run>/checkpoints/`:

    step_00000200/            a complete checkpoint (never modified after it appears)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's shards, one set per rank
        trainer_rank_00000.pt                           our per-rank state (RNG, data position)
        config.yaml                                     the resolved run config
        COMPLETE.json                                   marker: step + every file with its size
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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.errors import CheckpointError

MARKER = "COMPLETE.json"
LATEST = "latest"


@dataclass
class Restored:
    step: int
    trainer_state: dict
    """This rank's saved state (RNG, data position, tracking run id, ...)."""
    path: Path


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
        tag = _tag(step)
        staging = self.directory / f"{tag}.partial"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(self.directory), tag=staging.name, save_latest=False)
        torch.save(trainer_state, staging / f"trainer_rank_{self.rank:05d}.pt")
        _barrier()
        final = self.directory / tag
        if self.rank == 0:
            (staging / "config.yaml").write_text(config_yaml)
            files = {
                str(p.relative_to(staging)): p.stat().st_size
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            _atomic_write_text(staging / MARKER, json.dumps({"step": step, "files": files}))
            if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside
                old = self.directory / f"{tag}.replaced"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(staging, final)
                shutil.rmtree(old)
            else:
                os.replace(staging, final)
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

    # ------------------------------------------------------------------ load
    def load(self, engine, path: Path | None = None) -> Restored | None:
        """Restore engine (model, optimizer, LR schedule) and this rank's trainer state."""
        path = path or self.latest()
        if path is None:
            return None
        verify_checkpoint(path)
        load_path, _ = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
        own = path / f"trainer_rank_{self.rank:05d}.pt"
        # A rank that did not exist when the checkpoint was written (the data-parallel size grew)
        # starts from rank 0's state: the data position is global, RNG states are re-derived.
        state_file = own if own.is_file() else path / "trainer_rank_00000.pt"
        trainer_state = torch.load(state_file, weights_only=False)
        marker = json.loads((path / MARKER).read_text())
        return Restored(step=int(marker["step"]), trainer_state=trainer_state, path=path)


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
