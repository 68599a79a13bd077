"""Shared fixtures: a small demo dataset built once per session and fast training configs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Keep the 2-core CI machine from oversubscribing, and the test output free of MLflow noise.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
# Real English text (Shakespeare's plays, public domain; the 1.1 MB "tinyshakespeare" extract).
SHAKESPEARE = REPO / "tests" / "data" / "tinyshakespeare.txt"
TINY_SEQ_LEN = 32


@pytest.fixture(autouse=True)
def _fixed_global_rng():
    """Every test starts from the same global RNG state.

    Without this a test that draws from the global generator sees a state that depends on
    which tests ran before it (and on which were skipped), so it could pass here and fail
    on another machine.
    """
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The built-in grammar corpus as shards: seq_len 32, a small BPE, several train shards."""
    from data_pipeline.build import build_dataset
    from data_pipeline.grammar import generate_documents

    out = tmp_path_factory.mktemp("demo") / "data"
    build_dataset(
        [],
        out,
        seq_len=TINY_SEQ_LEN,
        vocab_size=512,
        samples_per_shard=256,
        val_fraction=0.05,
        seed=0,
        documents=generate_documents(1500, seed=0),
        log=lambda *a: None,
    )
    return out


def tiny_overrides(data: Path, out: Path, name: str = "t", **extra) -> list[str]:
    """Overrides that make configs/tiny.yaml a seconds-long run on `data`."""
    values = {
        "run.name": name,
        "run.output_dir": str(out),
        "data.path": str(data),
        "data.seq_len": TINY_SEQ_LEN,
        "model.hidden_size": 64,
        "model.num_layers": 2,
        "model.num_attention_heads": 4,
        "model.ffn_hidden_size": 128,
        "train.steps": 8,
        "train.micro_batch_size": 8,
        "train.log_interval": 2,
        "train.eval_interval": 0,
        "train.eval_batches": 2,
        "train.checkpoint_interval": 4,
        "optim.warmup_steps": 2,
        "tracking.enabled": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def runtime():
    """torch.distributed (gloo, world of one) + Megatron-core groups, shared by in-process tests.

    DeepSpeed caches process groups per process, so the runtime is created once and reused by
    every in-process training run; multi-process tests spawn their own processes.
    """
    from pretrain.config import load_config
    from pretrain.parallel.runtime import init_runtime

    return init_runtime(load_config(None, ["train.device=cpu"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 with its store under `root`; (process, URI) once it
    answers /health. It runs in a session of its own (it serves from child processes); end it
    with `stop_mlflow_server`."""
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - the server process keeps it open
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--workers", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, uri
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_mlflow_server(proc, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
        time.sleep(0.5)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run `dlm ARGV` in this process; it must fail with exit status 2 and one stderr line
    `error: ...`, which is returned."""
    from launcher.cli import main as dlm

    capsys.readouterr()
    status = dlm(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, (status, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def stop_mlflow_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the server and its workers (its whole session), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


class Planted:
    """Unpickling this runs `touch FLAG` through a shell (what a malicious checkpoint would do):
    FLAG existing afterwards means something unpickled it."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))
