"""Where tasks come from: the project's local tasks (`pretrain/evaluation/tasks/`), the user's
`--include-path` directories, and, only when a requested name is in neither, the harness's
built-in task library (indexing its few thousand YAML files takes seconds, so a run on local
tasks never pays for it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pretrain.errors import ConfigError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_manager(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()):
    """A `TaskManager` that knows every name in `tasks` (a one-line error naming the unknown)."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR]
    for p in include_paths:
        if not Path(p).is_dir():
            raise ConfigError(f"--include-path {p}: not a directory of task YAML files")
        paths.append(Path(p))
    local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if all(t in local.all_tasks or Path(t).is_file() for t in tasks):
        return local
    full = TaskManager(include_path=[str(p) for p in paths])
    unknown = [t for t in tasks if t not in full.all_tasks and not Path(t).is_file()]
    if unknown:
        raise ConfigError(
            f"--tasks: unknown task(s) {', '.join(unknown)} (not in the harness, "
            f"{TASKS_DIR} or any --include-path)"
        )
    return full


def split_tasks(text: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (blank entries dropped)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = [t.strip() for t in items if t.strip()]
    if not out:
        raise ConfigError("--tasks: no task names given")
    return out
