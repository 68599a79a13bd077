"""`dlm eval` end to end on demo models trained here on the demo grammar: a causal LM (300 steps,
scored exactly) beats chance on the agreement task (and on its local half) by more than 2
standard errors; its adaptation
to masked diffusion (`ar_adapt`, 100 steps, scored through the Monte-Carlo bound) runs the
diffusion paths: an export scores like its checkpoint, `generate_until` honours stop sequences,
two torchrun processes give one process's results, the training-time hook logs
`tasks/<task>/<metric>` to MLflow, and the export loads with the ecosystem's plain calls.

A masked model trained from scratch for a CPU test's budget does not leave the unigram plateau
(1000 steps at batch 16: training loss 4.46, agreement 0.475): docs/evaluation.md has the numbers
of the README's demo model instead.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from pretrain.config import DiffusionConfig, load_config
from pretrain.evaluation.scoring import Request

TINY = REPO / "configs" / "tiny.yaml"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def demo(runtime, demo_data, tmp_path_factory):
    """The causal model, its diffusion adaptation (about 25 s together on 2 idle cores), the
    adaptation's checkpoint and export."""
    from pretrain.hf.export import export_checkpoint
    from pretrain.trainer import train

    os.environ.update(OFFLINE)
    out = tmp_path_factory.mktemp("eval")
    common = {"train.log_interval": 50, "optim.lr": 3e-3, "optim.warmup_steps": 20}
    ar = {"diffusion.objective": "ar", "train.steps": 300, "train.checkpoint_interval": 300}
    causal = train(load_config(TINY, tiny_overrides(demo_data, out, "ar", **common, **ar)))
    adapt = {
        "diffusion.objective": "ar_adapt",
        "diffusion.anneal_steps": 50,
        "train.init_from": str(causal.checkpoint),
        "train.steps": 100,
        "train.checkpoint_interval": 100,
        # the training-time hook: one harness task at the last step, into a real MLflow store
        "eval.tasks": "[dlm_agreement]",
        "eval.task_interval": 100,
        "eval.task_limit": 8,
        "eval.task_mc_samples": 8,
        "tracking.enabled": True,
        "tracking.uri": f"sqlite:///{out}/mlflow.db",
    }
    cfg = load_config(TINY, tiny_overrides(demo_data, out, "adapt", **common, **adapt))
    result = train(cfg)
    export = export_checkpoint(result.checkpoint, out / "hf", register=False)
    return {
        "cfg": cfg,
        "checkpoint": result.checkpoint,
        "causal": causal.checkpoint,
        "export": export,
        "out": out,
        "result": result,
    }


@pytest.fixture(scope="module")
def lm(demo):
    from pretrain.evaluation.harness import DLMEvalHarness

    return DLMEvalHarness(str(demo["checkpoint"]), mc_samples=16, batch_size=64)


def test_causal_demo_model_beats_chance_on_agreement_through_the_cli(demo, tmp_path):
    """`dlm eval CKPT --tasks dlm_agreement`: accuracy above 0.5 by more than 2 of the harness's
    standard errors, on the group and on local agreement; exact scores (no Monte-Carlo error)."""
    from launcher.cli import main

    out = tmp_path / "results.json"
    args = ["eval", str(demo["causal"]), "--tasks", "dlm_agreement", "--limit", "200"]
    assert main([*args, "--batch-size", "64", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    for name in ("dlm_agreement", "dlm_agreement_local"):
        row = results["groups" if name == "dlm_agreement" else "results"][name]
        acc, stderr = row["acc,none"], row["acc_stderr,none"]
        assert acc - 2 * stderr > 0.5, (name, acc, stderr)
    # agreement across an attractor is not learnt in 300 CPU steps (about 0.5): reported only
    assert results["results"]["dlm_agreement_long"]["acc_stderr,none"] > 0
    assert results["dlm"]["estimator"]["estimator"].startswith("ar objective (exact")
    assert results["dlm"]["tasks"]["dlm_agreement_local"]["mc_stderr_mean"] == 0.0
    assert results["n-samples"]["dlm_agreement_local"]["effective"] == 200


def test_diffusion_model_reports_its_monte_carlo_error(lm):
    """The adapted diffusion model through the harness: per-task Monte-Carlo standard errors,
    the share of close decisions (paired over the choices' shared masks) and requests/s."""
    from pretrain.evaluation.runner import evaluate_tasks

    results = evaluate_tasks(lm, ["dlm_agreement_local"], limit=40)
    report = results["dlm"]
    assert "ar_adapt objective, linear schedule (shifted)" in report["estimator"]["estimator"]
    task = report["tasks"]["dlm_agreement_local"]
    assert task["requests"] == 80 and 0 < task["mc_stderr_mean"] <= task["mc_stderr_max"]
    assert 0 <= task["decisions_within_2se"] < 1
    assert report["speed"]["loglikelihood"]["requests_per_s"] > 0
    assert 0 <= results["results"]["dlm_agreement_local"]["acc,none"] <= 1


def test_export_scores_like_its_checkpoint_in_every_layout(demo, lm):
    """The exported DLMForMaskedLM (loaded through the project's modeling code, RoPE positions
    passed for block diffusion's [x_t ; x0]) gives the checkpoint model's scores."""
    from pretrain.evaluation.layouts import build_layout
    from pretrain.evaluation.loading import load_eval_model
    from pretrain.evaluation.scoring import Scorer

    hf = load_eval_model(demo["export"])
    assert type(hf.net).__name__ == "HFNet" and hf.diffusion == demo["cfg"].diffusion
    ids = [lm.model.encode(t) for t in ("the keys to the cabinet", " are red .", " is old .")]
    requests = [Request(tuple(ids[0]), tuple(ids[1])), Request(tuple(ids[0]), tuple(ids[2]))]
    for cfg in (DiffusionConfig(), DiffusionConfig(objective="block", block_length=4)):
        layout = build_layout(cfg, seq_len=32, mask_id=hf.mask_id)
        kw = {"samples": 8, "batch_size": 8, "seed": 0, "max_length": 32, "pad_id": hf.eos_id}
        ours = Scorer(lm.model.net, layout, **kw).score(requests)
        theirs = Scorer(hf.net, layout, **kw).score(requests)
        for a, b in zip(ours, theirs, strict=True):
            assert abs(a.loglik - b.loglik) < 1e-4 and a.greedy == b.greedy


def test_generate_until_stops_at_stop_sequences_and_eos(lm):
    from lm_eval.api.instance import Instance

    from pretrain.evaluation.decoding import objective_decoder

    cases = [("the keys to the cabinet", [" ."]), ("the dog", [" the", " ."]), ("i like", [])]
    requests = [
        Instance("generate_until", {}, (ctx, {"until": until, "max_gen_toks": 12}), 0)
        for ctx, until in cases
    ]
    texts = lm.generate_until(requests)
    generate, model_fn, options = objective_decoder(lm.model)
    stopped = 0
    for (ctx, until), text in zip(cases, texts, strict=True):
        prompt = torch.tensor([lm.model.encode(ctx)])
        raw = generate(model_fn, prompt, gen_length=12, mask_id=lm.model.mask_id,
                       tokens_per_step=1, **options)[0, prompt.shape[1]:].tolist()  # fmt: skip
        if lm.model.eos_id in raw:
            raw = raw[: raw.index(lm.model.eos_id)]
        full = lm.model.decode(raw)
        cut = min([full.index(s) for s in until if s in full], default=len(full))
        assert text == full[:cut], (ctx, text, full)
        assert not any(s in text for s in until)
        stopped += cut < len(full)
    assert stopped >= 1  # a stop sequence was met (the test is not vacuous)


def test_rolling_loglikelihood_is_the_sum_of_its_windows_bounds(lm):
    """`loglikelihood_rolling`: a text within one window is one request after <eos>; a longer
    one is cut into the harness's disjoint windows (every token predicted once), whose bounds
    add up (each window's masks as when scored alone)."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    short = "the dog sees the cats ."
    long = " ".join(["the keys to the old cabinet are red ."] * 6)
    ids = lm.model.encode(short)
    requests = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in (short, long)]
    got = lm.loglikelihood_rolling(requests)
    (alone,) = lm.scorer.score([Request((lm.model.eos_id,), tuple(ids))])
    assert abs(got[0] - alone.loglik) < 1e-9
    tokens = lm.model.encode(long)
    assert len(tokens) > lm.max_length  # several windows
    pieces = get_rolling_token_windows(tokens, lm.model.eos_id, lm.max_length - 1, 1)
    windows = [make_disjoint_window(p) for p in pieces]
    assert len(windows) > 1 and sum(len(c) for _, c in windows) == len(tokens)  # each once
    assert all(len(ctx) + len(c) <= lm.max_length for ctx, c in windows)
    parts = lm.scorer.score([Request(tuple(ctx), tuple(c)) for ctx, c in windows])
    assert abs(got[1] - sum(s.loglik for s in parts)) < 1e-6
    assert got[1] < got[0] < 0


def test_the_documented_local_task_runs_from_an_include_path(lm, tmp_path):
    """docs/evaluation.md's own example task (its YAML and its loader, copied out of the page)
    with a jsonl beside them, through `--include-path` semantics: no network, any directory."""
    from pretrain.evaluation.runner import evaluate_tasks

    page = (REPO / "docs" / "evaluation.md").read_text()
    blocks = {}
    for block in page.split("```")[1::2]:
        body = block.split("\n", 1)[1]
        if body.startswith("# my_tasks/"):
            blocks[body.split("\n", 1)[0].removeprefix("# my_tasks/")] = body
    assert set(blocks) == {"capitals.yaml", "utils.py"}
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    for name, body in blocks.items():
        (tasks / name).write_text(body)
    rows = [
        {"country": "the dog", "choices": [" likes tennis", " like tennis"], "answer": 0},
        {"country": "the cats", "choices": [" sees the dog", " see the dog"], "answer": 1},
    ]
    (tasks / "capitals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = evaluate_tasks(lm, ["capitals"], include_paths=[tasks])
    assert results["n-samples"]["capitals"]["effective"] == 2
    assert results["dlm"]["tasks"]["capitals"]["requests"] == 4


TASKS = ["dlm_agreement_long", "dlm_agreement_gen"]
"""A multiple-choice task (Monte-Carlo scored) and a generation task."""


def _torchrun_eval(demo, out: Path, nproc: int) -> dict:
    """`dlm eval` in `nproc` fresh processes under torchrun (gloo on CPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    env |= OFFLINE | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", "-m", "launcher.cli"]  # fmt: skip
    args = ["eval", str(demo["checkpoint"]), "--tasks", ",".join(TASKS)]
    args += ["--limit", "10", "--mc-samples", "8", "--batch-size", "5", "--log-samples"]
    done = subprocess.run(
        [*launcher, *args, "--output", str(out), "--device", "cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_torchrun_processes_give_one_process_results(demo, tmp_path):
    """`dlm eval` over two torchrun processes (each scores half of the requests and decodes half
    of the generations) gives this process's results, sample by sample."""
    from pretrain.evaluation.harness import DLMEvalHarness
    from pretrain.evaluation.runner import evaluate_tasks

    lm = DLMEvalHarness(str(demo["checkpoint"]), mc_samples=8, batch_size=5, device="cpu")
    one = evaluate_tasks(lm, TASKS, limit=10, log_samples=True)
    one = json.loads(json.dumps(one, default=str))  # as the CLI writes it
    two = _torchrun_eval(demo, tmp_path / "two.json", 2)
    assert one["dlm"]["estimator"]["processes"] == 1
    assert two["dlm"]["estimator"]["processes"] == 2
    for task in TASKS:
        assert one["results"][task] == two["results"][task]
        a = sorted(one["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(two["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in a] == list(range(10)) == [s["doc_id"] for s in b]
        for x, y in zip(a, b, strict=True):
            if task == "dlm_agreement_long":  # [[loglik, is_greedy]] per choice
                for (ll_x, g_x), (ll_y, g_y) in zip(
                    [r[0] for r in x["resps"]], [r[0] for r in y["resps"]], strict=True
                ):
                    assert abs(float(ll_x) - float(ll_y)) < 1e-5 and str(g_x) == str(g_y)
            else:
                assert x["resps"] == y["resps"]
    mc_one, mc_two = (r["dlm"]["tasks"]["dlm_agreement_long"] for r in (one, two))
    assert abs(mc_one["mc_stderr_mean"] - mc_two["mc_stderr_mean"]) < 1e-6


def test_training_logs_task_metrics_to_mlflow(demo):
    """`eval.tasks` during training (the trainer's hook, the model through `Engine.infer`): the
    group and its tasks, our Monte-Carlo error and requests/s, in the run's MLflow store."""
    import mlflow

    result = demo["result"]
    metrics = result.evals[100]
    for name in ("dlm_agreement/acc", "dlm_agreement/acc_stderr", "dlm_agreement_long/acc"):
        assert f"tasks/{name}" in metrics  # the group and its tasks
    assert metrics["tasks/dlm_agreement_local/mc_stderr_mean"] > 0
    assert metrics["tasks/loglikelihood_requests_per_s"] > 0
    assert 0 <= metrics["tasks/dlm_agreement/acc"] <= 1
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    logged = client.get_run(result.run_id).data.metrics
    assert logged["tasks/dlm_agreement/acc"] == metrics["tasks/dlm_agreement/acc"]
    assert "val/nelbo_per_token_slot" in logged  # next to the validation NELBO


class _Prompted(Exception):
    pass


def _load_quietly(fn, monkeypatch) -> tuple[object, list[str], bool]:
    """Call fn with stdin prompts detected and transformers' warnings captured."""
    prompted = []

    def no_input(*args):
        prompted.append(args)
        raise _Prompted

    monkeypatch.setattr("builtins.input", no_input)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        out = fn()
    finally:
        logger.removeHandler(handler)
    return out, records, bool(prompted)


def test_export_loads_with_plain_calls_and_readable_weights(demo, monkeypatch):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    hf = demo["export"]
    recorded = json.loads((hf / "tokenizer_config.json").read_text())
    assert recorded["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok, logs, prompted = _load_quietly(
        lambda: AutoTokenizer.from_pretrained(hf, trust_remote_code=True), monkeypatch
    )
    assert not prompted and not logs, logs
    assert tok.mask_token == "<mask>" and tok("the dog").input_ids
    model, logs, prompted = _load_quietly(
        lambda: AutoModelForMaskedLM.from_pretrained(hf, trust_remote_code=True), monkeypatch
    )
    assert not prompted and not any("to instantiate a model of type" in m for m in logs), logs
    assert model.config.diffusion["objective"] == "ar_adapt"
    # every file of the export gets the mode of an ordinary new file (0644 under umask 022)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in hf.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.xfail(
    int(__import__("transformers").__version__.split(".")[0]) >= 5,
    strict=True,
    reason="transformers 5's AutoTokenizer resolves the model config (auto_map -> custom code) "
    "before reading tokenizer_config.json, so a custom-code model directory prompts",
)
def test_plain_auto_tokenizer_does_not_ask_to_run_custom_code(demo, monkeypatch):
    from transformers import AutoTokenizer

    _, logs, prompted = _load_quietly(
        lambda: AutoTokenizer.from_pretrained(demo["export"]), monkeypatch
    )
    assert not prompted and not logs, logs


def test_eval_command_is_registered_and_reports_bad_input(tmp_path, capsys):
    from launcher.cli import build_parser, main

    args = build_parser().parse_args(["eval", "ckpt", "--tasks", "a,b", "--limit", "0.5"])
    assert args.limit == 0.5 and args.mc_samples == 128
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "dlm_agreement"]) == 2
    assert "no such checkpoint or exported model directory" in capsys.readouterr().err


def test_agreement_task_file_is_the_grammar_s_minimal_pairs():
    from data_pipeline.grammar import check_agreement
    from pretrain.evaluation.agreement import TASK_FILE, build_pairs

    rows = [json.loads(line) for line in TASK_FILE.read_text().splitlines()]
    assert rows == build_pairs()
    assert sum(r["attractor"] for r in rows) > 100
    for r in rows:
        good, bad = (check_agreement(f"{r['prefix']} {r[k]}") for k in ("good", "bad"))
        assert good.parsed and good.agrees and bad.parsed and not bad.agrees
