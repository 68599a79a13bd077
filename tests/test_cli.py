"""The `dlm` entry point: every subcommand has --help; user errors are one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from launcher.cli import COMMANDS, main

DIST_ENV = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
"""torch.distributed's rendezvous variables: an in-process runtime (other tests) sets them, and
its port is taken."""


def python_last_line(code: str, timeout: int = 120) -> tuple[str, str]:
    """Run `code` in a fresh interpreter at the repo root, with a rendezvous of its own: (its
    last stdout line, its stderr); it must exit 0."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1], proc.stderr


def dlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda p: " ".join(p) or "dlm")
def test_every_subcommand_has_help(path):
    proc = dlm(*path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: dlm" in proc.stdout


def test_help_lists_the_main_commands():
    out = dlm("--help").stdout
    assert "data" in out and "train" in out and "config" in out
    build = dlm("data", "build", "--help").stdout
    assert "--seq-len" in build and "--demo" in build and "--tokenizer" in build


def test_unknown_config_key_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    proc = dlm("train", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: unknown key 'train.stepz' (valid keys: steps, micro_batch_size, "
        "grad_accum_steps, seed, device, precision, log_interval, eval_interval, eval_batches, "
        "checkpoint_interval, checkpoint_minutes, checkpoint_async, keep_last, resume, init_from, "
        "on_nonfinite, spike_zscore, spike_window, verify_checkpoints)"
    ]


@pytest.mark.parametrize(
    "argv", [["--help"], ["config", "show", "configs/tiny.yaml"], ["config", "docs"]]
)
def test_light_commands_import_no_heavy_library(argv):
    """`dlm --help` and `dlm config ...` start without torch, DeepSpeed or Megatron (about a
    second, and no library warnings): the parser imports only the selected command's module."""
    code = (
        "import sys, contextlib, io\n"
        "from launcher.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules))"
    )
    last, stderr = python_last_line(code)
    assert last == "[]"
    assert "Setting accelerator" not in stderr


def test_missing_config_file(capsys):
    assert main(["train", "does/not/exist.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: does/not/exist.yaml: config file not found"


def test_empty_input_file_is_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["data", "build", str(empty), "--out", str(tmp_path / "o"), "--seq-len", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err and "empty" in err


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", str(REPO / "configs" / "tiny.yaml"), "train.steps=9"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 9 and shown["model"]["hidden_size"] == 128


def test_config_docs_lists_every_key(capsys):
    assert main(["config", "docs"]) == 0
    out = capsys.readouterr().out
    assert "train.steps = 1000" in out and "diffusion.schedule = linear" in out


def test_the_dlm_command_destroys_its_process_groups_after_a_run(demo_data, tmp_path):
    """`dlm` (`launcher.cli:entry`) destroys torch.distributed's groups once `train` has
    succeeded: left to the interpreter's exit, gloo's threads can abort a finished run with
    SIGABRT."""
    from conftest import tiny_overrides

    overrides = tiny_overrides(demo_data, tmp_path, "entry", **{"train.steps": 2})
    code = (
        "import sys\n"
        "from launcher import cli\n"
        f"sys.argv = ['dlm', 'train', {str(REPO / 'configs' / 'tiny.yaml')!r}, *{overrides!r}]\n"
        "code = cli.entry()\n"
        "import torch.distributed as dist\n"
        "print('RESULT', code, dist.is_initialized())\n"
    )
    assert python_last_line(code, timeout=300)[0] == "RESULT 0 False"
