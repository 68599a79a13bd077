"""Nothing a checkpoint or a dataset holds is executed: checkpoint records are JSON (old `.pt`
records are read with the restricted unpickler only), and shard names from a manifest never
reach a shell or a URL opener."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, Planted, tiny_overrides

from data_pipeline.manifest import Manifest
from data_pipeline.reader import TokenBlockStream
from data_pipeline.shards import shard_location
from pretrain.checkpoint.format import CheckpointReader
from pretrain.checkpoint.manager import MARKER, load_trainer_state, verify_checkpoint
from pretrain.checkpoint.marker import write_marker
from pretrain.checkpoint.records import read_record, write_record
from pretrain.config import load_config
from pretrain.errors import CheckpointError, DataError
from pretrain.hf.source import read_checkpoint
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"


def _reseal(ckpt: Path) -> None:
    """Rewrite the completion marker so that its sizes and hashes match the planted files (an
    attacker controls the whole directory)."""
    write_marker(ckpt, json.loads((ckpt / MARKER).read_text())["step"])


@pytest.fixture(scope="module")
def checkpoint(runtime, demo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safe")
    result = train(load_config(TINY, tiny_overrides(demo_data, out, "safe", **{"train.steps": 2})))
    return result.checkpoint


def test_records_are_json_and_round_trip(checkpoint, tmp_path):
    assert not list(checkpoint.rglob("*.pt"))
    common = json.loads((checkpoint / "common.json").read_text())
    assert common["step"] == 2 and common["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    state = load_trainer_state(checkpoint, 0)
    assert state["rng_cpu"].dtype == torch.uint8 and state["rng_cpu"].numel() > 100
    write_record(tmp_path / "r.json", {"t": torch.arange(5, dtype=torch.int64), "x": [1, "a"]})
    back = read_record(tmp_path / "r.json")
    assert torch.equal(back["t"], torch.arange(5)) and back["x"] == [1, "a"]
    with pytest.raises(ValueError, match="non-finite"):
        write_record(tmp_path / "bad.json", {"lr": float("nan")})


@pytest.mark.parametrize("record", ["common", "trainer"])
def test_planted_legacy_pickle_is_refused_not_run(checkpoint, tmp_path, record):
    ckpt = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, ckpt)
    flag = tmp_path / "executed"
    if record == "common":
        (ckpt / "common.json").unlink()
        target = ckpt / "common.pt"
    else:
        (ckpt / "trainer_rank_00000.json").unlink()
        target = ckpt / "trainer_rank_00000.pt"
    target.write_bytes(pickle.dumps({"step": 2, "payload": Planted(flag)}))
    _reseal(ckpt)
    verify_checkpoint(ckpt)  # the marker matches: only the loader stands in the way
    with pytest.raises(CheckpointError, match=r"refused to load .*only tensors"):
        if record == "common":
            CheckpointReader(ckpt)
        else:
            load_trainer_state(ckpt, 0)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_checkpoint(ckpt)  # what `dlm export` and `dlm probe` read
    assert not flag.exists()


def test_pickle_disguised_as_json_is_refused(checkpoint, tmp_path):
    ckpt = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, ckpt)
    flag = tmp_path / "executed"
    (ckpt / "common.json").write_bytes(pickle.dumps(Planted(flag)))
    _reseal(ckpt)
    with pytest.raises(CheckpointError, match="common.json: not a JSON checkpoint record"):
        CheckpointReader(ckpt)
    assert not flag.exists()


def test_legacy_plain_records_still_load(checkpoint, tmp_path):
    """Checkpoints written before the JSON records (torch.save of plain dicts) still resume."""
    ckpt = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, ckpt)
    common = read_record(ckpt / "common.json")
    state = load_trainer_state(ckpt, 0)
    (ckpt / "common.json").unlink()
    (ckpt / "trainer_rank_00000.json").unlink()
    torch.save(common, ckpt / "common.pt")
    torch.save(state, ckpt / "trainer_rank_00000.pt")
    _reseal(ckpt)
    assert CheckpointReader(ckpt).common == common
    assert torch.equal(load_trainer_state(ckpt, 0)["rng_cpu"], state["rng_cpu"])


def _manifest_with_name(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    first = raw["splits"]["train"][0]
    os.replace(dst / first["name"], dst / "renamed.tar")
    first["name"] = name
    (dst / "manifest.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize(
    "name",
    ["$(touch {flag}).tar", "x.tar; touch {flag}", "pipe:touch {flag}", "../x.tar", "a b.tar"],
)
def test_shard_names_never_reach_a_shell(demo_data, tmp_path, name):
    flag = tmp_path / "executed"
    bad = name.format(flag=flag)
    data = _manifest_with_name(demo_data, tmp_path / "data", bad)
    with pytest.raises(DataError, match=r"manifest.json: field 'splits.train\[0\].name'"):
        Manifest.load(data)
    # even with a data path of '.', where a name once became a `pipe:` command
    cwd = os.getcwd()
    try:
        os.chdir(data)
        with pytest.raises(DataError, match="plain file name"):
            TokenBlockStream(sources=["."], batch_size=2)
    finally:
        os.chdir(cwd)
    assert not flag.exists()


def test_local_shards_are_files_and_pipe_templates_quote_the_name(tmp_path):
    local = shard_location(".", "train-000000.tar")
    assert local.path == Path("train-000000.tar") and local.url is None
    piped = shard_location("d", "train-000000.tar", "pipe:aws s3 cp s3://b/{name} -")
    assert piped.url == "pipe:aws s3 cp s3://b/train-000000.tar -"
    with pytest.raises(DataError, match="plain file name"):
        shard_location("d", "x'$(id)'.tar", "pipe:cat {name}")
