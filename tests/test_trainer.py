"""End-to-end training on the demo shards: loss falls, exact resume, crash-safe checkpoints, and
bad input that fails with one clear line without touching the last good checkpoint."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

from launcher.cli import main as dlm
from pretrain.checkpoint.manager import CheckpointManager, verify_checkpoint
from pretrain.config import load_config
from pretrain.errors import CheckpointError, DataError
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"


def run(data: Path, out: Path, name: str = "t", stop_at: int | None = None, **extra):
    return train(load_config(TINY, tiny_overrides(data, out, name, **extra)), stop_at=stop_at)


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_training_reduces_loss_and_writes_checkpoints(runtime, demo_data, tmp_path):
    result = run(
        demo_data,
        tmp_path,
        **{"train.steps": 40, "train.eval_interval": 20, "train.checkpoint_interval": 20},
    )
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 40
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.5, (first, last)
    assert set(result.evals) == {20, 40}
    assert (
        result.evals[40]["val/nelbo_per_token_slot"] < result.evals[20]["val/nelbo_per_token_slot"]
    )
    ckpts = CheckpointManager(tmp_path / "t" / "checkpoints", keep_last=2)
    assert [p.name for p in ckpts.complete_checkpoints()] == ["step_00000020", "step_00000040"]
    assert ckpts.latest() == result.checkpoint == tmp_path / "t" / "checkpoints" / "step_00000040"
    assert (result.checkpoint / "config.yaml").read_text().startswith("run:")


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_resume_reproduces_uninterrupted_losses_exactly(runtime, demo_data, tmp_path, zero_stage):
    """N steps straight == N/2 steps, checkpoint, new trainer, resume, N/2 steps: identical losses
    (model, optimizer, LR schedule, data position and corruption all restored)."""
    extra = {"train.grad_accum_steps": 2, "parallel.zero_stage": zero_stage}
    straight = run(demo_data, tmp_path, "straight", **extra)
    first = run(demo_data, tmp_path, "resumed", stop_at=4, **extra)
    assert first.checkpoint.name == "step_00000004" and sorted(first.losses) == [1, 2, 3, 4]
    second = run(demo_data, tmp_path, "resumed", **extra)
    assert sorted(second.losses) == [5, 6, 7, 8]
    assert {**first.losses, **second.losses} == straight.losses


def test_interrupted_save_leaves_previous_checkpoint_loadable(
    runtime, demo_data, tmp_path, monkeypatch
):
    """A save that dies after DeepSpeed wrote its files (disk full, preemption) never becomes
    `latest`; the next start resumes from the previous checkpoint and loses nothing."""
    straight = run(demo_data, tmp_path, "straight")
    run(demo_data, tmp_path, "crash", stop_at=4)
    ckpt_dir = tmp_path / "crash" / "checkpoints"
    before = tree_digest(ckpt_dir / "step_00000004")

    from pretrain.checkpoint import manager

    real_write = manager.write_record

    def failing_write(path, value):
        if "trainer_rank" in str(path):
            raise OSError("No space left on device")
        return real_write(path, value)

    monkeypatch.setattr(manager, "write_record", failing_write)
    with pytest.raises(OSError, match="No space left"):
        run(demo_data, tmp_path, "crash")
    monkeypatch.undo()

    (staging,) = ckpt_dir.glob("step_00000008.partial.*")  # a name of this process's own
    assert staging.is_dir()  # DeepSpeed's files were written ...
    assert not (ckpt_dir / "step_00000008").exists()  # ... but never promoted
    assert (ckpt_dir / "latest").read_text().strip() == "step_00000004"
    assert tree_digest(ckpt_dir / "step_00000004") == before
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        verify_checkpoint(staging)

    resumed = run(demo_data, tmp_path, "crash")
    assert {s: resumed.losses[s] for s in (5, 6, 7, 8)} == {
        s: straight.losses[s] for s in (5, 6, 7, 8)
    }
    assert not staging.exists()  # stale (the run lock is held): cleaned by the good save


def test_keep_last_prunes_old_checkpoints(runtime, demo_data, tmp_path):
    run(demo_data, tmp_path, **{"train.checkpoint_interval": 2, "train.keep_last": 2})
    names = sorted(p.name for p in (tmp_path / "t" / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000006", "step_00000008"]


def test_truncated_checkpoint_file_is_refused(runtime, demo_data, tmp_path):
    result = run(demo_data, tmp_path, stop_at=4)
    shard_file = result.checkpoint / "shards" / "rank-00000.safetensors"
    shard_file.write_bytes(shard_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"shards/rank-00000\.safetensors' has 100 bytes"):
        run(demo_data, tmp_path)


def _copy_data(demo_data: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(demo_data, dst)
    return dst


def _break_missing_shard(data: Path) -> str:
    (data / "train-00001.tar").unlink()
    return r"train-00001\.tar: shard is missing; listed in .*manifest\.json"


def _break_corrupt_shards(data: Path) -> str:
    # Checksums are verified as each shard is opened (hashing terabytes up front is not an
    # option at scale), so corrupt every shard the resumed run could read next.
    for shard in sorted(data.glob("train-*.tar")):
        shard.write_bytes(shard.read_bytes()[:3000])
    return r"train-0000\d\.tar: sha256 is .* but the manifest says"


@pytest.mark.parametrize(
    "breaker, overrides, message",
    [
        (_break_missing_shard, {}, None),
        (_break_corrupt_shards, {}, None),
        (
            None,
            {"data.seq_len": 64},
            r"manifest\.json: seq_len is 32 but the config's data\.seq_len is 64",
        ),
        (
            None,
            {"model.vocab_size": 100},
            r"tokenizer\.vocab_size is 512 but the config's model\.vocab_size is 100",
        ),
    ],
    ids=["missing-shard", "corrupt-shard", "seq-len-mismatch", "vocab-too-small"],
)
def test_bad_data_fails_with_one_line_and_keeps_the_checkpoint(
    runtime, demo_data, tmp_path, capsys, breaker, overrides, message
):
    data = _copy_data(demo_data, tmp_path)
    good = run(data, tmp_path, stop_at=4)
    before = tree_digest(good.checkpoint.parent)
    if breaker is not None:
        message = breaker(data)
    argv = ["train", str(TINY), *tiny_overrides(data, tmp_path, **overrides)]
    capsys.readouterr()
    assert dlm(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(message, err), err
    assert tree_digest(good.checkpoint.parent) == before


def test_tokenizer_mismatch_names_both_hashes(runtime, demo_data, tmp_path):
    from data_pipeline.tokenizer import train_bpe

    other = tmp_path / "other.json"
    train_bpe(["completely different text " * 20], vocab_size=300).save(str(other))
    with pytest.raises(DataError, match=r"tokenizer\.sha256 is .* but the run's tokenizer has"):
        run(demo_data, tmp_path, **{"data.tokenizer": str(other)})
    # the dataset's own tokenizer is accepted
    run(
        demo_data,
        tmp_path,
        "ok",
        **{"data.tokenizer": str(demo_data / "tokenizer.json"), "train.steps": 1},
    )


def test_no_validation_batches_means_no_evaluation(runtime, demo_data, tmp_path):
    """`train.eval_batches=0` trains and checkpoints without evaluating (no val metrics)."""
    overrides = tiny_overrides(demo_data, tmp_path, "noeval", **{"train.eval_batches": 0})
    result = train(load_config(TINY, overrides + ["train.steps=2"]))
    assert sorted(result.losses) == [1, 2] and result.checkpoint is not None
    assert all(not metrics for metrics in result.evals.values())
