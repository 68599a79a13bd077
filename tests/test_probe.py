"""The information-decay probe and the distance-bucketed CE: exact values on synthetic models,
and the real thing through the trainer hook (MLflow) and `dlm probe` / `dlm generate`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch
from conftest import REPO, tiny_overrides

from pretrain.probe.buckets import bucket_edges, distance_bucketed_ce, nearest_visible_distance
from pretrain.probe.probe import frequent_token_ids, run_probe

V, MASK, EOS = 10, 9, 0


def test_probe_records_exact_profiles_of_a_known_model():
    """A model whose distribution at distance k is uniform over the first k + 1 tokens: entropy
    log(k + 1), p(eos = token 0) = 1/(k + 1), top-1 = token 0 (frequent) from k = 0."""
    K = 6

    def model_fn(x):
        logits = torch.full((*x.shape, V), -1e9)
        p = (x[0] != MASK).sum().item()
        for i in range(x.shape[1]):
            k = max(i - p, 0)
            logits[:, i, : min(k + 1, V - 1)] = torch.linspace(1e-4, 0, min(k + 1, V - 1))
        return logits

    prompts = [torch.tensor([3, 4, 5]), torch.tensor([1, 2])]
    result = run_probe(
        model_fn,
        prompts,
        mask_id=MASK,
        eos_id=EOS,
        frequent_ids=torch.tensor([0, 1]),
        num_masks=K,
        decode=lambda i: "abcdefghij"[i],
    )
    for k in range(K):
        assert math.isclose(result.entropy[k], math.log(k + 1), abs_tol=1e-3)
        assert math.isclose(result.p_eos[k], 1 / (k + 1), rel_tol=1e-3)
    assert result.frequent_share == [1.0] * K
    rec = result.prompts[0]
    assert rec["top_ids"][2] == [0, 1, 2] and len(rec["top_probs"][2]) == 3
    assert rec["prompt_tokens"] == ["d", "e", "f"] and rec["top_tokens"][2] == ["a", "b", "c"]
    buckets = result.bucket_summary()  # distances 1, 2, 3-4, 5-6 (the first mask is at 1)
    assert list(buckets) == ["1", "2", "3-4", "5-6"] and buckets["3-4"]["count"] == 2
    expect = (math.log(3) + math.log(4)) / 2
    assert math.isclose(buckets["3-4"]["entropy"], expect, rel_tol=1e-3)
    summary = result.summary(near=2)
    assert math.isclose(summary["probe/entropy_far"], (math.log(5) + math.log(6)) / 2, rel_tol=1e-3)


def test_frequent_ids_and_nearest_visible_distance_against_brute_force():
    batch = torch.tensor([[5, 5, 5, 2, 2, 7, MASK, MASK]])
    assert frequent_token_ids([batch], 2, exclude=(MASK,)).tolist() == [5, 2]
    g = torch.Generator().manual_seed(0)
    masked = torch.rand(6, 20, generator=g) < 0.7
    masked[0] = True  # an all-masked row
    dist = nearest_visible_distance(masked)
    for b in range(6):
        visible = [j for j in range(20) if not masked[b, j]]
        for i in range(20):
            expect = min((abs(i - j) for j in visible), default=20)
            assert dist[b, i] == expect
    assert bucket_edges(20) == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 20)]


def test_bucketed_ce_groups_masked_positions_by_distance():
    """With CE = the distance itself, each bucket's mean lies within its edges, and the counts add
    up to the number of masked positions."""
    x0 = [
        torch.randint(0, MASK, (8, 32), generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]

    def ce_fn(x_t, targets):
        return nearest_visible_distance(x_t == MASK).float()

    out = distance_bucketed_ce(ce_fn, x0, mask_id=MASK)
    for label, row in out.items():
        lo, hi = (int(v) for v in label.split("-")) if "-" in label else (int(label),) * 2
        assert lo <= row["ce"] <= hi
    assert sum(r["count"] for r in out.values()) > 100


def test_probe_in_training_logs_to_mlflow_and_cli_probe_generate(demo_data, tmp_path, runtime):
    from pretrain.config import load_config
    from pretrain.tracking.mlflow_tracker import create_tracker  # noqa: F401
    from pretrain.trainer import train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    field_prompts = tmp_path / "field_prompts.jsonl"  # the prompt under another field name
    field_prompts.write_text('{"prompt": "the keys to the", "id": 1}\n{"prompt": "i like"}\n')
    cfg = load_config(
        "configs/tiny.yaml",
        tiny_overrides(
            demo_data,
            tmp_path,
            "probe",
            **{
                "train.steps": 4,
                "eval.probe_interval": 2,
                "eval.probe_masks": 24,
                "eval.probe_prompts": str(field_prompts),
                "eval.probe_field": "prompt",
                "tracking.enabled": True,
                "tracking.uri": uri,
                "diffusion.schedule": "distance",
                "diffusion.prefix_probability": 0.5,
            },
        ),
    )
    result = train(cfg)
    pngs = sorted((result.run_dir / "probe").glob("*.png"))
    assert [p.name for p in pngs] == ["probe_step_00000002.png", "probe_step_00000004.png"]
    data = json.loads(pngs[-1].with_suffix(".json").read_text())
    assert len(data["profiles"]["entropy"]) == 24 and data["distance_bucketed_ce"]
    assert len(data["prompts"]) == 2 and "".join(data["prompts"][1]["prompt_tokens"]) == "i like"
    assert set(data["bucket_summary"]) == {"1", "2", "3-4", "5-8", "9-16", "17-24"}
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert "probe/entropy_far" in run.data.metrics and "val/ce_dist_1" in run.data.metrics
    history = client.get_metric_history(result.run_id, "probe/entropy_near")
    assert [m.step for m in history] == [2, 4]
    artifacts = [a.path for a in client.list_artifacts(result.run_id)]
    assert "probe_step_00000004.png" in artifacts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "the keys to the cabinet"}\n{"text": "i like"}\n')
    out = tmp_path / "probe-out"
    # a fresh process group of one in each CLI process (not this test process's rendezvous)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}

    def dlm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launcher.cli", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = dlm(
        "probe",
        str(result.run_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--masks",
        "16",
        "--val-batches",
        "100000",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # more batches than the split holds: clamped with a message, no sequence twice
    held = json.loads((demo_data / "manifest.json").read_text())
    held = sum(s["num_samples"] for s in held["splits"]["val"])
    batch = min(8, held)
    assert f"holds {held} sequences, {held // batch} batches of {batch}" in done.stdout
    probe = json.loads((out / "probe.json").read_text())
    assert len(probe["prompts"]) == 2 and len(probe["profiles"]["p_eos"]) == 16
    counted = sum(row["count"] for row in probe["distance_bucketed_ce"].values())
    assert counted <= held * 32  # masked positions of each validation sequence at most once
    assert probe["prompts"][0]["top_tokens"] and probe["bucket_summary"]
    assert (out / "probe.png").stat().st_size > 1000
    # two checkpoints in one figure
    ckpt = result.run_dir / "checkpoints" / "step_00000004"
    many = tmp_path / "probe-many"
    done = dlm(
        "probe",
        str(result.run_dir),
        str(ckpt),
        "--prompts",
        str(prompts),
        "--out",
        str(many),
        "--masks",
        "16",
        "--val-batches",
        "1",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in many.iterdir())
    assert names == [
        "overlay.png",
        "probe_probe.json",
        "probe_probe.png",
        "probe_probe_step_00000004.json",
        "probe_probe_step_00000004.png",
    ]
    done = dlm("generate", str(result.run_dir), "--prompt", "the keys", "--gen-length", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("the keys")
    # infilling templates: only the spans are decoded, the text around them is kept
    done = dlm(
        "generate",
        str(result.run_dir),
        "--template",
        "the keys [MASK:3] the cabinet",
        "--template",
        "[MASK:2] like tennis .",
        "--mark-spans",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.strip().splitlines()[-2:]
    assert first.startswith("the keys [[") and first.endswith("]] the cabinet"), first
    assert second.startswith("[[") and second.endswith("]] like tennis ."), second
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    done = dlm("probe", str(result.run_dir), "--prompts", str(bad), "--out", str(out))
    assert done.returncode == 2 and "bad.jsonl:1: expected a JSON object" in done.stderr
    assert "set by --field" in done.stderr and "found: prompt" in done.stderr
