"""Parallel layouts proven equal to one process, and checkpoints across layouts.

Real multi-process jobs (torchrun, gloo on CPU) run `tests/distributed_worker.py`; their losses
and final parameters are compared with single-process runs of the same config and seed, whose
micro-batch holds the same global batch. Tolerances (fp32 on CPU): per-step losses within 1e-5
absolute (observed <= 6e-7: only the order of floating-point sums differs) and final parameters
within 1e-4 absolute (observed <= 4e-6; Adam's 1/sqrt(v) amplifies rounding in tiny moments).
Resuming at the same layout must be bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

from pretrain.checkpoint.convert import convert_checkpoint
from pretrain.checkpoint.format import CheckpointReader
from pretrain.checkpoint.manager import CheckpointManager, verify_checkpoint
from pretrain.config import load_config
from pretrain.trainer import train

STEPS, HALF = 6, 3
LOSS_ATOL, PARAM_ATOL = 1e-5, 1e-4
TINY = REPO / "configs" / "tiny.yaml"


def overrides(data: Path, out: Path, name: str, micro: int = 4, **extra) -> list[str]:
    values = {
        "train.steps": STEPS,
        "train.micro_batch_size": micro,
        "train.grad_accum_steps": 2,
        "train.log_interval": 1,
        "train.eval_interval": STEPS,
        "train.checkpoint_interval": HALF,
        **extra,
    }
    return tiny_overrides(data, out, name, **values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, runs: list[dict], workdir: Path, expect_failure: bool = False) -> list[dict]:
    """Run `runs` in one torchrun job of `nproc` processes; returns rank 0's results."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec, out = workdir / "spec.json", workdir / "out.json"
    spec.write_text(json.dumps(runs))
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
        str(REPO / "tests" / "distributed_worker.py"), str(spec), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if expect_failure:
        assert proc.returncode != 0, "the job was expected to die"
        return []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]
    return json.loads(out.read_text())


def losses(result) -> dict[int, float]:
    raw = result.losses if hasattr(result, "losses") else result["losses"]
    return {int(k): v for k, v in raw.items()}


def assert_losses_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    worst = max(abs(got[s] - want[s]) for s in got)
    assert worst <= LOSS_ATOL, f"max loss difference {worst:.3g} > {LOSS_ATOL}"


def assert_params_close(ckpt_a: Path, ckpt_b: Path) -> None:
    a, b = CheckpointReader(ckpt_a), CheckpointReader(ckpt_b)
    assert a.names() == b.names()
    worst = max((a.full(n) - b.full(n)).abs().max().item() for n in a.names())
    assert worst <= PARAM_ATOL, f"max parameter difference {worst:.3g} > {PARAM_ATOL}"


@pytest.fixture(scope="module")
def reference(runtime, demo_data, tmp_path_factory):
    """Single-process runs: micro-batch 4 (same global batch as TP/PP) and 8 (as DP=2 x 4)."""
    out = tmp_path_factory.mktemp("reference")
    return {
        4: train(load_config(TINY, overrides(demo_data, out, "single4"))),
        8: train(load_config(TINY, overrides(demo_data, out, "single8", micro=8))),
        "out": out,
    }


@pytest.fixture(scope="module")
def dp2(demo_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("dp2")
    runs = [
        {"overrides": overrides(demo_data, work, f"zero{z}", **{"parallel.zero_stage": z})}
        for z in (1, 2, 3)
    ]
    for z in (1, 3):  # interrupted at HALF, then resumed by a second trainer in the same job
        o = overrides(demo_data, work, f"resume{z}", **{"parallel.zero_stage": z})
        runs += [{"overrides": o, "stop_at": HALF}, {"overrides": o}]
    results = launch(2, runs, work)
    return {"work": work, "results": results}


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_data_parallel_matches_single_process(reference, dp2, zero):
    result = dp2["results"][zero - 1]
    assert_losses_close(losses(result), losses(reference[8]))
    assert_params_close(Path(result["checkpoint"]), reference[8].checkpoint)


@pytest.mark.parametrize("zero, index", [(1, 3), (3, 5)])
def test_resume_at_same_layout_is_exact(dp2, zero, index):
    first, second = dp2["results"][index], dp2["results"][index + 1]
    assert sorted(losses(first)) == [1, 2, 3] and sorted(losses(second)) == [4, 5, 6]
    straight = dp2["results"][zero - 1]
    assert {**losses(first), **losses(second)} == losses(straight)


def test_resume_after_data_parallel_size_change(reference, dp2, demo_data):
    """A DP=2 checkpoint resumed by one process continues as the single-process run would."""
    run_dir = dp2["work"] / "resume1"
    shutil.copytree(run_dir, dp2["work"] / "dp1")
    ckpts = CheckpointManager(dp2["work"] / "dp1" / "checkpoints", keep_last=9)
    for later in [p for p in ckpts.complete_checkpoints() if p.name != "step_00000003"]:
        shutil.rmtree(later)
    (dp2["work"] / "dp1" / "checkpoints" / "latest").write_text("step_00000003\n")
    resumed = train(load_config(TINY, overrides(demo_data, dp2["work"], "dp1", micro=8)))
    assert sorted(losses(resumed)) == [4, 5, 6]
    assert_losses_close(losses(resumed), {s: losses(reference[8])[s] for s in (4, 5, 6)})


SP = {"parallel.tensor_parallel": 2, "parallel.sequence_parallel": True}


@pytest.mark.parametrize(
    "layout",
    [
        {"parallel.tensor_parallel": 2},
        {"parallel.pipeline_parallel": 2},
        SP,
        {"parallel.tensor_parallel": 2, "model.sparse_output_recompute": True},
    ],
    ids=["tp2", "pp2", "tp2-sequence-parallel", "tp2-recomputed-head"],
)
def test_model_parallel_matches_single_process(reference, demo_data, tmp_path, layout):
    run = {
        "overrides": overrides(demo_data, tmp_path, "mp", **layout),
        "cpu_sequence_parallel": "parallel.sequence_parallel" in layout,
    }
    (result,) = launch(2, [run], tmp_path)
    assert_losses_close(losses(result), losses(reference[4]))
    assert_params_close(Path(result["checkpoint"]), reference[4].checkpoint)


def test_tp2_pp2_matches_and_converts_both_ways(reference, demo_data, tmp_path):
    """4 processes, TP=2 x PP=2 (ZeRO-1), with and without sequence parallelism: equal to one
    process; its mid-run checkpoint converted to TP1 x PP1 continues in one process as the
    single-process run does; and a single-process checkpoint converted to TP2 x PP2 continues in
    4 processes the same way."""
    layout = {"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2}
    single_half = reference["out"] / "single4" / "checkpoints" / "step_00000003"
    verify_checkpoint(single_half)
    convert_checkpoint(single_half, tmp_path / "from-single" / "checkpoints", tp=2, pp=2)
    results = launch(
        4,
        [
            {"overrides": overrides(demo_data, tmp_path, "tp2pp2", **layout)},
            {"overrides": overrides(demo_data, tmp_path, "from-single", **layout)},
            {
                "overrides": overrides(demo_data, tmp_path, "tp2pp2-sp", **{**layout, **SP}),
                "cpu_sequence_parallel": True,
            },
        ],
        tmp_path / "job",
    )
    straight, from_single, sequence_parallel = results
    want = losses(reference[4])
    assert_losses_close(losses(straight), want)
    assert_losses_close(losses(sequence_parallel), want)
    assert_params_close(Path(straight["checkpoint"]), reference[4].checkpoint)
    assert_losses_close(losses(from_single), {s: want[s] for s in (4, 5, 6)})

    half = tmp_path / "tp2pp2" / "checkpoints" / "step_00000003"
    converted = convert_checkpoint(half, tmp_path / "to-single" / "checkpoints", tp=1, pp=1)
    assert sorted(p.name for p in (converted / "shards").iterdir()) == ["rank-00000.safetensors"]
    resumed = train(load_config(TINY, overrides(demo_data, tmp_path, "to-single")))
    assert_losses_close(losses(resumed), {s: want[s] for s in (4, 5, 6)})
    assert_params_close(resumed.checkpoint, reference[4].checkpoint)


def test_killed_mid_save_keeps_previous_checkpoint(reference, demo_data, tmp_path):
    """Rank 0 is killed while sealing step 4's checkpoint (every shard already written): the job
    dies, step 2 stays `latest` and loads, and training resumes from it as if nothing happened."""
    o = overrides(demo_data, tmp_path, "killed", micro=4, **{"train.checkpoint_interval": 2})
    launch(2, [{"overrides": o, "crash_at_save": 4}], tmp_path / "job", expect_failure=True)
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step_00000002"
    (staging,) = ckpt_dir.glob("step_00000004.partial.*")
    assert (staging / "shards").is_dir()
    assert not (ckpt_dir / "step_00000004").exists()
    reader = CheckpointReader(CheckpointManager(ckpt_dir, keep_last=3).latest())
    assert reader.common["step"] == 2 and reader.common["layout"]["dp"] == 2
    resumed = train(load_config(TINY, overrides(demo_data, tmp_path, "killed", micro=8)))
    assert_losses_close(losses(resumed), {s: losses(reference[8])[s] for s in (3, 4, 5, 6)})


def test_checkpoint_shards_are_written_by_every_rank(dp2):
    """Each rank writes its own shard; together they hold each tensor exactly once."""
    ckpt = Path(dp2["results"][0]["checkpoint"])
    files = sorted(p.name for p in (ckpt / "shards").iterdir())
    assert files == ["rank-00000.safetensors", "rank-00001.safetensors"]
    reader = CheckpointReader(ckpt)
    assert all(len(entries) == 1 for entries in reader.index.values())
    sizes = [(ckpt / "shards" / f).stat().st_size for f in files]
    assert min(sizes) > 0.2 * max(sizes)  # the writing is shared, not all on rank 0
    assert json.loads((ckpt / "common.json").read_text())["layout"] == {
        "tp": 1,
        "pp": 1,
        "dp": 2,
    }


def test_cpu_runtime_compiles_no_deepspeed_op(runtime):
    """On CPU the DeepSpeed communicator starts without its JIT-built shared-memory op (a minute
    of C++ per stale build, and a lock that a killed build leaves behind)."""
    import deepspeed.comm.comm as ds_comm

    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
