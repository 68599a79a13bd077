"""Output directories of export/import: staged next to the target, never clobbering by accident."""

from __future__ import annotations

import shutil
from pathlib import Path

from pretrain.errors import ConfigError


def staging_dir(out: str | Path, *, overwrite: bool) -> tuple[Path, Path]:
    """(resolved target, fresh `<target>.partial`), checked before any work is done.

    A non-empty target is only replaced with `overwrite`: `dlm export CKPT .` must not delete
    the current directory because of a typo.
    """
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out}: already exists and is not empty; pass --overwrite to replace it")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return out, staging


def publish(staging: Path, out: Path) -> None:
    """Move the complete staging directory into place (the old target is removed only then)."""
    if out.exists():
        old = out.with_name(out.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
