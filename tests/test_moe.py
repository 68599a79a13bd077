"""Mixture-of-experts layers on one process: config checks, the MoE MLP against the exported
plain-PyTorch one (routing and dispatch), router metrics in MLflow, the memory plan's counts,
export with equal logits, upcycling a dense checkpoint (ours, or an imported causal LM),
activation checkpointing and the benchmark script on CPU.

Tolerance of the logit comparisons: as tests/test_hf_export.py (1e-4 absolute, fp32; the
exported model runs each expert on its tokens in another order of operations).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides
from mlflow import MlflowClient

from pretrain.checkpoint.format import CheckpointReader, load_weights
from pretrain.config import ModelConfig, MoEConfig, load_config
from pretrain.errors import ConfigError
from pretrain.model.moe import model_tensors, moe_blocks
from pretrain.model.moe_metrics import router_metrics
from pretrain.parallel.memory import (
    Layout,
    active_parameters,
    parameter_counts,
    per_gpu_memory,
    stage_parameter_split,
)
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"
LOGIT_ATOL = 1e-4
VOCAB = 300
MOE = {
    "model.moe.num_experts": 4,
    "model.moe.top_k": 2,
    "model.moe.expert_ffn_hidden_size": 64,
    "model.moe.aux_loss_coeff": 0.1,
}
# name -> overrides: every routing and expert option the exported modeling code must follow
VARIANTS = {
    "softmax-shared-gate": {
        **MOE,
        "model.moe.shared_expert_ffn_hidden_size": 32,
        "model.moe.shared_expert_gate": True,
        "model.moe.z_loss_coeff": 0.01,
    },
    "pre-softmax-top1": {**MOE, "model.moe.top_k": 1, "model.moe.pre_softmax": True},
    "sigmoid-bias-every-other": {
        **MOE,
        "model.moe.score_function": "sigmoid",
        "model.moe.expert_bias_update_rate": 0.1,
        "model.moe.layer_frequency": 2,
        "train.steps": 3,  # odd: the +-rate moves of the biases cannot cancel to 0
    },
}


def small(**moe) -> ModelConfig:
    base = dict(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96)
    return ModelConfig(**base, moe=MoEConfig(**{"num_experts": 4, "top_k": 2, **moe}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.moe.num_experts": 4, "model.moe.top_k": 5}, "model.moe.top_k (5) must be in"),
        ({"parallel.expert_parallel": 2}, "parallel.expert_parallel 2 needs routed experts"),
        (
            {"model.moe.num_experts": 3, "parallel.expert_parallel": 2},
            "model.moe.num_experts (3) must be divisible by parallel.expert_parallel (2)",
        ),
        (
            {"model.moe.num_experts": 4, "model.moe.expert_bias_update_rate": 0.1},
            "needs model.moe.score_function 'sigmoid'",
        ),
        (
            {**MOE, "parallel.expert_parallel": 2, "optim.master_weights": "deepspeed"},
            "parallel.expert_parallel > 1 needs the fused optimizer",
        ),
    ],
)
def test_bad_moe_config_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_router_metrics_count_what_the_routers_chose(runtime):
    """The metrics equal the loads computed from the routing maps the layers returned; with a
    capacity factor below 1 tokens are dropped, and the dropped share is what capacity cut."""
    from pretrain.model.parallelize import build_model

    model = build_model(
        small(capacity_factor=0.5), vocab_size=VOCAB, mask_token_id=VOCAB - 1, seed=0
    ).train()
    maps = []
    for block in moe_blocks(model):
        real = block.router.routing

        def record(logits, padding_mask=None, _real=real):
            probs, routing_map = _real(logits)
            maps.append(routing_map.detach())
            return probs, routing_map

        block.router.routing = record
    tokens = torch.randint(0, VOCAB - 1, (4, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, targets=tokens).mean().backward()
    got = router_metrics(model, 2, 4, count=True)
    load = torch.stack([m.sum(0).double() for m in maps])  # [layers, E] kept assignments
    share = load / load.sum(1, keepdim=True)
    entropy = -(share * share.log()).sum(1) / math.log(4)
    assert got["moe/expert_load_max"] == pytest.approx(float(share.max() * 4))
    assert got["moe/expert_load_min"] == pytest.approx(float(share.min() * 4))
    assert got["moe/expert_load_entropy"] == pytest.approx(float(entropy.mean()))
    routed = 2 * 4 * 16 * 2  # layers x tokens x top-k
    assert got["moe/dropped_fraction"] == pytest.approx(1 - float(load.sum()) / routed)
    assert got["moe/dropped_fraction"] > 0.1
    assert got["moe/load_balancing_loss"] > 0
    assert router_metrics(model, 2, 4, count=True) == {}  # read once: the window starts anew


def test_memory_plan_counts_the_built_moe_model(runtime):
    from pretrain.model.parallelize import build_model

    cfg = small(shared_expert_ffn_hidden_size=32, shared_expert_gate=True, layer_frequency=2)
    model = build_model(cfg, vocab_size=VOCAB, mask_token_id=VOCAB - 1, seed=0)
    counts = parameter_counts(cfg, VOCAB)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    ((dense, routed),) = stage_parameter_split(cfg, VOCAB, tp=1, pp=1)
    assert (dense, routed) == (counts["total"] - experts, experts)
    ((_, routed_ep2),) = stage_parameter_split(cfg, VOCAB, tp=1, pp=1, ep=2)
    assert routed_ep2 == experts // 2
    per_expert = experts // 4
    assert active_parameters(cfg, VOCAB) == counts["total"] - 2 * per_expert  # top-2 of 4
    # EP spreads the experts: less memory per GPU at the same data-parallel size
    ep1 = per_gpu_memory(cfg, VOCAB, Layout(1, 1, 4, zero_stage=0, seq_len=32))
    ep4 = per_gpu_memory(cfg, VOCAB, Layout(1, 1, 4, zero_stage=0, seq_len=32, ep=4))
    assert ep1.params - ep4.params == 2 * (experts - experts // 4)  # bf16 weights
    with pytest.raises(ConfigError, match="must divide the data-parallel size"):
        per_gpu_memory(cfg, VOCAB, Layout(1, 1, 2, seq_len=32, ep=4))


@pytest.fixture(scope="module")
def trained(runtime, demo_data, tmp_path_factory):
    """A 4-step tracked run per variant (the last steps move the expert biases) + its export."""
    from pretrain.hf.export import export_checkpoint

    out = tmp_path_factory.mktemp("moe")
    uri = f"sqlite:///{out}/mlflow.db"
    runs = {}
    for name, extra in VARIANTS.items():
        o = tiny_overrides(
            demo_data,
            out,
            name,
            **{
                "train.steps": 4,
                "train.checkpoint_interval": 4,
                "train.log_interval": 2,
                "tracking.enabled": True,
                "tracking.uri": uri,
                **extra,  # may shorten the run
            },
        )
        cfg = load_config(TINY, o)
        result = train(cfg)
        runs[name] = {
            "cfg": cfg,
            "result": result,
            "hf": export_checkpoint(result.checkpoint, out / name / "hf"),
        }
    return {"runs": runs, "uri": uri}


def ours(cfg, checkpoint: Path):
    from pretrain.model.parallelize import build_model

    manifest = json.loads((Path(cfg.data.path) / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    net = build_model(cfg.model, vocab_size=tok["vocab_size"], mask_token_id=tok["mask_id"])
    load_weights(CheckpointReader(checkpoint), model_tensors(net), tp_rank=0, tp_size=1)
    return net.eval(), tok


def logits_of(net, hf_dir, tok):
    from transformers import AutoModelForMaskedLM

    hf = AutoModelForMaskedLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tokens = torch.randint(
        0, tok["vocab_size"], (3, 32), generator=torch.Generator().manual_seed(0)
    )
    tokens[:, ::3] = tok["mask_id"]
    with torch.no_grad():
        return net(tokens), hf(input_ids=tokens).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_moe_logits_equal_ours(trained, variant):
    run = trained["runs"][variant]
    net, tok = ours(run["cfg"], run["result"].checkpoint)
    if "bias" in variant:  # the auxiliary-loss-free balancing moved the biases: they matter
        assert any(b.router.expert_bias.abs().sum() > 0 for b in moe_blocks(net))
    want, got = logits_of(net, run["hf"], tok)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert (got[finite] - want[finite]).abs().max() <= LOGIT_ATOL


def test_router_metrics_reach_mlflow(trained):
    run = trained["runs"]["softmax-shared-gate"]["result"]
    client = MlflowClient(tracking_uri=trained["uri"])
    for key in ("expert_load_max", "expert_load_min", "expert_load_entropy", "dropped_fraction",
                "load_balancing_loss", "z_loss"):  # fmt: skip
        history = client.get_metric_history(run.run_id, f"moe/{key}")
        assert [m.step for m in history] == [2, 4], key
    entropy = client.get_metric_history(run.run_id, "moe/expert_load_entropy")[-1].value
    assert 0 < entropy <= 1
    lb = client.get_metric_history(run.run_id, "moe/load_balancing_loss")[-1].value
    assert 0 < lb < 1  # coefficient 0.1 x 2 layers x about 1 (1 = balanced)


def test_upcycled_moe_starts_as_the_dense_model(runtime, demo_data, tmp_path):
    """A dense checkpoint as `train.init_from` of an MoE run: every expert a copy of the dense
    MLP, so logits equal the dense model's and the first step's loss is the dense run's."""
    from pretrain.model.parallelize import build_model
    from pretrain.model.upcycle import UpcycledReader, open_init_checkpoint

    base = {"train.steps": 2, "train.checkpoint_interval": 2}
    dense = train(load_config(TINY, tiny_overrides(demo_data, tmp_path, "dense", **base)))
    moe = {**MOE, "model.moe.expert_ffn_hidden_size": "null", "model.moe.aux_loss_coeff": 0}
    init = {**base, "train.init_from": str(dense.checkpoint)}
    cfgs = {
        "dense": load_config(TINY, tiny_overrides(demo_data, tmp_path, "d2", **init)),
        "moe": load_config(TINY, tiny_overrides(demo_data, tmp_path, "m2", **init, **moe)),
    }
    reader = open_init_checkpoint(dense.checkpoint, cfgs["moe"], verify=True)
    assert isinstance(reader, UpcycledReader)
    manifest = json.loads((demo_data / "manifest.json").read_text())["tokenizer"]
    nets = {}
    for name, cfg in cfgs.items():
        net = build_model(cfg.model, vocab_size=manifest["vocab_size"], mask_token_id=0)
        source = reader if name == "moe" else CheckpointReader(dense.checkpoint)
        load_weights(source, model_tensors(net), tp_rank=0, tp_size=1)
        nets[name] = net.eval()
    assert len(moe_blocks(nets["moe"])) == 2
    tokens = torch.randint(0, manifest["vocab_size"], (2, 32), generator=torch.Generator())
    with torch.no_grad():
        want, got = nets["dense"](tokens), nets["moe"](tokens)
    finite = torch.isfinite(want)
    assert (got[finite] - want[finite]).abs().max() <= 1e-5
    first = {name: train(cfg).losses[1] for name, cfg in cfgs.items()}
    assert abs(first["moe"] - first["dense"]) <= 1e-5, first
    narrow = load_config(TINY, tiny_overrides(demo_data, tmp_path, "n", **init, **MOE))
    with pytest.raises(ConfigError, match=r"expert_ffn_hidden_size \(64\) equal to"):
        open_init_checkpoint(dense.checkpoint, narrow, verify=False)


def test_llada_moe_preset_has_the_published_size():
    model = load_config(REPO / "configs" / "llada-moe-7b.yaml").model
    total = parameter_counts(model, 157184)["total"]
    active = active_parameters(model, 157184)
    assert 7.0e9 < total < 7.6e9, f"{total:,}"
    assert 1.5e9 < active < 1.9e9, f"{active:,}"  # 1.07B without embedding and head


@pytest.mark.slow
def test_moe_benchmark_script_runs_on_cpu(demo_data, tmp_path):
    """bench/moe_step.py's logic with a toy model on CPU (the GPU run is the lead's)."""
    import subprocess
    import sys

    out = tmp_path / "moe.jsonl"
    cmd = [
        sys.executable, str(REPO / "bench" / "moe_step.py"), "--device", "cpu",
        "--config", str(TINY), "--seq", "32", "--micro-batch", "2", "--steps", "1",
        "--warmup", "1", "--experts", "4", "--top-k", "2", "--expert-ffn", "32",
        "--data", str(demo_data), "--no-profile", "--modes", "dense,moe", "--out", str(out),
    ]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense, moe = (json.loads(line) for line in out.read_text().splitlines())
    assert dense["tokens_per_s"] > 0 and moe["tokens_per_s"] > 0
    assert moe["params"] > dense["params"]  # 4 experts of 32 vs one SwiGLU of 2 x 32
    # the same active work per token but the router's (and the masked fractions' difference)
    assert abs(moe["active_flops_per_token"] / dense["active_flops_per_token"] - 1) < 0.05


def test_activation_checkpointing_recomputes_the_same_moe_step(runtime, demo_data, tmp_path):
    """Recomputed MoE layers (in backward) route, dispatch and attach their losses again
    without counting twice: the run equals the one that keeps activations, expert bias too."""
    extra = {**VARIANTS["sigmoid-bias-every-other"], "model.moe.z_loss_coeff": 0.01}
    runs = {
        ckpt: train(
            load_config(
                TINY,
                tiny_overrides(
                    demo_data, tmp_path, f"ckpt-{ckpt}",
                    **{**extra, "model.activation_checkpointing": ckpt},
                ),
            )
        )
        for ckpt in (False, True)
    }  # fmt: skip
    assert runs[True].losses == pytest.approx(runs[False].losses, abs=1e-6)
    a, b = (CheckpointReader(r.checkpoint) for r in runs.values())
    for name in a.names():
        assert torch.allclose(a.full(name), b.full(name), atol=1e-6), name


def test_recomputed_moe_layers_replay_the_forwards_routing(
    runtime, demo_data, tmp_path, monkeypatch
):
    """A recomputed router whose logits are not the forward's (on a GPU a different kernel
    choice in backward flips near-ties: `[144, 1024]` saved vs `[142, 1024]` recomputed) still
    routes every token as the forward did, because the layer's top-k results are saved and
    replayed (`moe.keep_routing`): the run equals the one that keeps activations. Here the
    recomputed logits get a constant offset (no gradient through it) large enough to reroute
    tokens; without the replay the same run fails on the changed shapes. The router losses are
    off: their gradients are taken at the recomputed logits (on a GPU, last-bit different)."""
    from torch.utils.checkpoint import CheckpointError, CheckpointPolicy

    from pretrain.model import moe

    real = moe.Router.gating

    def gating(self, input):
        logits = real(self, input)
        # the same ops in the forward and its recomputation (selective checkpointing checks
        # that), different values: an offset only when recomputing
        n = logits.numel()
        offset = torch.sin(torch.arange(n, device=logits.device, dtype=logits.dtype))
        return logits + (2.0 if moe._in_backward() else 0.0) * offset.view_as(logits)

    monkeypatch.setattr(moe.Router, "gating", gating)
    extra = {**MOE, "model.moe.aux_loss_coeff": 0.0, "train.steps": 3}

    def run(name, ckpt):
        overrides = {**extra, "model.activation_checkpointing": ckpt}
        return train(load_config(TINY, tiny_overrides(demo_data, tmp_path, name, **overrides)))

    kept, replayed = run("kept", False), run("replayed", True)
    assert replayed.losses == pytest.approx(kept.losses, abs=1e-6)
    a, b = (CheckpointReader(r.checkpoint) for r in (kept, replayed))
    for name in a.names():
        assert torch.allclose(a.full(name), b.full(name), atol=1e-6), name
    monkeypatch.setattr(moe, "keep_routing", lambda *_, **__: CheckpointPolicy.PREFER_RECOMPUTE)
    with pytest.raises(CheckpointError, match="different metadata"):  # the GPU's failure
        run("rerouted", True)


def test_compiled_moe_layers_recompute_with_the_gradients_they_keep(runtime):
    """Layers compiled one by one (`model.compile`) are recomputed without the routing replay:
    selective checkpointing around a compiled MoE layer gave the experts' weights gradients up
    to 10% off. Checkpointed and compiled, every gradient equals the eager one that keeps its
    activations within 1e-5 of its largest magnitude (observed 6e-7)."""
    import dataclasses

    from fp8_worker import build, case_loss, inputs

    from pretrain.parallel.build import compile_model

    def grads(ckpt: bool, compiled: bool):
        model = small(expert_ffn_hidden_size=64)
        model = dataclasses.replace(model, activation_checkpointing=ckpt, compile=compiled)
        module = build(model, vocab=300, mask=299, seed=3, sequence_parallel=False)
        module.train()
        if compiled:
            compile_model(module, load_config(TINY, ["model.compile=true"]))
        tokens, positions = inputs(300, 299)
        case_loss(module, tokens, positions, True).backward()
        return {n: p.grad.clone() for n, p in module.named_parameters()}

    torch._dynamo.reset()
    kept, recomputed = grads(False, False), grads(True, True)
    torch._dynamo.reset()
    for name, g in kept.items():
        worst = float((recomputed[name] - g).abs().max() / g.abs().max().clamp(min=1e-30))
        assert worst <= 1e-5, (name, worst)


def test_plan_prints_experts_per_gpu_and_dispatch_buffers(capsys):
    from launcher.cli import main

    main(["plan", str(REPO / "configs" / "llada-moe-7b.yaml"), "--layout", "1x1x16:1/8"])
    out = capsys.readouterr().out
    assert "| llada-moe-7b | 1x1x16/8 | 16 |" in out
    assert "1x1x16/8: 8 experts per GPU per layer, all-to-all buffers 0.50 GiB" in out


def test_causal_lm_upcycles_to_moe(runtime, tmp_path):
    """AR -> MoE: a Llama imported with `dlm import`, upcycled (every expert = its MLP), run with
    a causal mask, gives the Llama's logits."""
    import dataclasses

    from test_hf_import import SEQ, assert_logits_match, save_llama, yaml_config
    from test_hf_import import VOCAB as LLAMA_VOCAB

    from pretrain.hf.import_ar import import_causal_lm
    from pretrain.model.parallelize import build_model
    from pretrain.model.upcycle import UpcycledReader

    llama = save_llama(tmp_path / "llama", tokenizer=False)
    ckpt = import_causal_lm(tmp_path / "llama", tmp_path / "imported")
    cfg = yaml_config(ckpt)
    moe = MoEConfig(num_experts=4, top_k=2, aux_loss_coeff=0.0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))
    net = build_model(cfg.model, vocab_size=cfg.model.vocab_size, mask_token_id=LLAMA_VOCAB)
    reader = UpcycledReader(CheckpointReader(ckpt), cfg)
    load_weights(reader, model_tensors(net), tp_rank=0, tp_size=1)
    assert len(moe_blocks(net)) == 2
    tokens = torch.randint(0, LLAMA_VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    with torch.no_grad():
        want = llama(input_ids=tokens).logits
        got = net.eval()(tokens, attention_mask=causal)
    assert_logits_match(got, want)
