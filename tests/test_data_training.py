"""The data pipeline inside real training runs: mixture + loader workers resume bit for bit, and a
skipped bad shard is counted in MLflow (sqlite store, real runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import REPO, tiny_overrides
from mlflow import MlflowClient

from data_pipeline.manifest import Manifest
from data_pipeline.reader import TokenBlockStream
from pretrain.config import load_config
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"
SEED = load_config(TINY).train.seed


def run(data: Path, out: Path, name: str, stop_at: int | None = None, **extra):
    return train(load_config(TINY, tiny_overrides(data, out, name, **extra)), stop_at=stop_at)


def test_mixture_with_workers_resumes_like_an_uninterrupted_run(runtime, demo_data, tmp_path):
    """8 straight steps (no workers) == 4 steps with 2 workers + checkpoint + 4 steps with 1
    worker: the data stream, hence every loss, is the same."""
    other = tmp_path / "other"
    shutil.copytree(demo_data, other)
    sources = json.dumps([{"path": str(demo_data), "weight": 3}, {"path": str(other)}])
    mix = {"data.sources": sources, "data.truncate_fraction": 0.1}
    straight = run(demo_data, tmp_path, "straight", **mix)
    first = run(demo_data, tmp_path, "resumed", stop_at=4, **mix, **{"data.num_workers": 2})
    second = run(demo_data, tmp_path, "resumed", **mix, **{"data.num_workers": 1})
    assert sorted(first.losses) == [1, 2, 3, 4] and sorted(second.losses) == [5, 6, 7, 8]
    assert {**first.losses, **second.losses} == straight.losses


def test_skipped_bad_shard_is_counted_in_mlflow(runtime, demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    # Damage the shard the run reads first (the stream's order depends only on the seed).
    first_shard, _ = TokenBlockStream(data, batch_size=1, seed=SEED)._sources[0].order.locate(0)
    name = Manifest.load(data).splits["train"][first_shard].name
    (data / name).write_bytes((data / name).read_bytes()[:3000])  # a truncated tar
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run(
        data,
        tmp_path,
        "skip",
        **{
            "data.on_bad_shard": "skip",
            "tracking.enabled": True,
            "tracking.uri": uri,
            "train.steps": 12,  # 12 x 8 blocks: more than one shard of 256, so the bad one is hit
        },
    )
    assert len(result.losses) == 12
    history = MlflowClient(tracking_uri=uri).get_metric_history(
        result.run_id, "data/skipped_shards"
    )
    assert history and history[-1].value == 1.0
