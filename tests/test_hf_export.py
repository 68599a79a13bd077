"""`dlm export`: checkpoint -> Hugging Face directory -> `AutoModelForMaskedLM`, equal logits.

Tolerance: the exported model and ours compute the same fp32 function in a different order of
operations (separate q/k/v and gate/up matmuls instead of fused ones, another SDPA call), so logits
agree to rounding: within 1e-4 absolute on logits of magnitude ~1 (observed ~1e-6).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from pretrain.checkpoint.convert import convert_checkpoint
from pretrain.checkpoint.format import CheckpointReader, load_weights
from pretrain.config import load_config
from pretrain.hf.export import export_checkpoint
from pretrain.trainer import train

TINY = REPO / "configs" / "tiny.yaml"
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def trained(runtime, demo_data, tmp_path_factory):
    """A 4-step tracked run with grouped KV heads (4 query heads, 2 groups) and its export."""
    out = tmp_path_factory.mktemp("hf-export")
    overrides = tiny_overrides(
        demo_data,
        out,
        "hfrun",
        **{
            "train.steps": 4,
            "train.checkpoint_interval": 4,
            "train.eval_interval": 4,
            "model.num_query_groups": 2,
            "tracking.enabled": True,
        },
    )
    cfg = load_config(TINY, overrides)
    result = train(cfg)
    exported = export_checkpoint(result.checkpoint, out / "hf")
    return {"cfg": cfg, "result": result, "hf": exported, "out": out, "data": demo_data}


def ours(cfg, checkpoint: Path):
    """Our Megatron-core model (single process) with the checkpoint's weights."""
    from pretrain.model.parallelize import build_model

    manifest = json.loads((Path(cfg.data.path) / "manifest.json").read_text())
    net = build_model(
        cfg.model,
        vocab_size=manifest["tokenizer"]["vocab_size"],
        mask_token_id=manifest["tokenizer"]["mask_id"],
    )
    load_weights(CheckpointReader(checkpoint), net.named_parameters(), tp_rank=0, tp_size=1)
    return net.eval(), manifest["tokenizer"]


def test_exported_logits_equal_ours(trained):
    from transformers import AutoModelForMaskedLM

    net, tok = ours(trained["cfg"], trained["result"].checkpoint)
    hf = AutoModelForMaskedLM.from_pretrained(trained["hf"], trust_remote_code=True).eval()
    assert type(hf).__name__ == "DLMForMaskedLM"
    tokens = torch.randint(
        0, tok["vocab_size"], (3, 32), generator=torch.Generator().manual_seed(0)
    )
    tokens[:, ::3] = tok["mask_id"]  # masked positions, as the model sees them in training
    with torch.no_grad():
        want = net(tokens)  # [b, s, V_pad]
        got = hf(input_ids=tokens).logits
        eager = AutoModelForMaskedLM.from_pretrained(
            trained["hf"], trust_remote_code=True, attn_implementation="eager"
        )(input_ids=tokens).logits
    assert got.shape == want.shape
    # the same -inf pattern: the mask token and the vocab padding are never predicted
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.isinf(got[..., tok["mask_id"]]).all()
    finite = torch.isfinite(want)
    worst = (got[finite] - want[finite]).abs().max().item()
    assert worst <= LOGIT_ATOL, f"max logit difference {worst:.3g}"
    assert (eager[finite] - want[finite]).abs().max().item() <= LOGIT_ATOL
    assert want[finite].abs().max() > 0.1  # the comparison is not between near-zero logits


def test_export_directory_contents(trained):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    hf = trained["hf"]
    config = json.loads((hf / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_dlm.DLMForMaskedLM"
    manifest = json.loads((trained["data"] / "manifest.json").read_text())["tokenizer"]
    assert config["num_key_value_heads"] == 2 and config["mask_token_id"] == manifest["mask_id"]
    assert config["prediction_vocab_size"] == manifest["vocab_size"]
    assert config["vocab_size"] % 128 == 0 and config["vocab_size"] >= manifest["vocab_size"]
    for name in ("model.safetensors", "generation_config.json", "modeling_dlm.py", "README.md"):
        assert (hf / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.mask_token == manifest["mask_token"] and tok.mask_token_id == manifest["mask_id"]
    assert (
        AutoConfig.from_pretrained(hf, trust_remote_code=True).mask_token_id == manifest["mask_id"]
    )
    body = AutoModel.from_pretrained(hf, trust_remote_code=True)
    assert type(body).__name__ == "DLMModel"
    full = AutoModelForMaskedLM.from_pretrained(hf, trust_remote_code=True)
    for name, param in body.named_parameters():  # the body's weights are loaded, not initialised
        assert torch.equal(param, full.model.get_parameter(name)), name
    card = (hf / "README.md").read_text()
    assert "val/ce_masked" in card and "hidden_size: 64" in card


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_export_from_tp2_pp2_checkpoint_equals_single_process(trained, tmp_path):
    """The same weights written as 4 shard files (TP=2 x PP=2, as a 4-process run saves them:
    one file per stage and TP rank) export to exactly the single-process export."""
    converted = convert_checkpoint(trained["result"].checkpoint, tmp_path / "tp2pp2", tp=2, pp=2)
    assert len(list((converted / "shards").iterdir())) == 4
    qkv = CheckpointReader(converted).index["layers.0.self_attention.linear_qkv.weight"]
    assert [e.tp_rank for e in qkv] == [0, 1] and qkv[0].tp_size == 2
    exported = export_checkpoint(converted, tmp_path / "hf", register=False)
    single, parallel = _tensors(trained["hf"]), _tensors(exported)
    assert sorted(single) == sorted(parallel)
    for name in single:
        assert torch.equal(single[name], parallel[name]), name
    assert json.loads((exported / "config.json").read_text()) == json.loads(
        (trained["hf"] / "config.json").read_text()
    )


def test_sharded_bf16_export_gradient_checkpointing_and_sampling(trained, tmp_path):
    from transformers import AutoModelForMaskedLM

    hf = export_checkpoint(
        trained["result"].checkpoint,
        tmp_path / "bf16",
        dtype="bfloat16",
        max_shard_size="40KB",
        register=False,
    )
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (hf / "model.safetensors").exists()
    fp32 = AutoModelForMaskedLM.from_pretrained(trained["hf"], trust_remote_code=True).eval()
    bf16 = AutoModelForMaskedLM.from_pretrained(hf, trust_remote_code=True, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    tokens = torch.randint(2, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = fp32(input_ids=tokens).logits
        got = bf16.eval()(input_ids=tokens).logits.float()
    finite = torch.isfinite(want)
    # bf16 weights and activations: ~3 significant digits; the logits stay close, not equal
    assert (got[finite] - want[finite]).abs().max().item() < 0.1

    # gradient checkpointing recomputes the layers in backward: same loss, same gradients
    labels = tokens.clone()
    fp32.train()
    loss = fp32(input_ids=tokens, labels=labels).loss
    loss.backward()
    plain = {n: p.grad.clone() for n, p in fp32.named_parameters()}
    fp32.zero_grad()
    fp32.gradient_checkpointing_enable()
    assert fp32.model.gradient_checkpointing
    calls, layer = [], fp32.model.layers[0]
    # count calls of forward itself: the recomputation does not re-run module hooks
    layer.forward = lambda *a, _f=layer.forward: calls.append(1) or _f(*a)
    loss_ckpt = fp32(input_ids=tokens, labels=labels).loss
    loss_ckpt.backward()
    del layer.forward
    assert len(calls) == 2  # the layer ran again in backward: activations were recomputed
    assert torch.allclose(loss, loss_ckpt)
    for name, param in fp32.named_parameters():
        assert torch.allclose(param.grad, plain[name], atol=1e-6), name

    # diffusion sampling fills every masked slot with a predictable token, prompt untouched
    fp32.eval()
    prompt = tokens[:, :8]
    out = fp32.diffusion_generate(prompt, max_new_tokens=16, steps=8, block_length=8)
    assert out.shape == (2, 24) and torch.equal(out[:, :8], prompt)
    assert (out != fp32.config.mask_token_id).all()
    assert (out < fp32.config.prediction_vocab_size).all()
    # with steps == new tokens and greedy decoding, each step commits the single most confident
    # token, so the first committed position is the argmax-confidence one of the first forward
    x = torch.cat([prompt, torch.full((2, 8), fp32.config.mask_token_id)], 1)
    with torch.no_grad():
        probs = torch.softmax(fp32(input_ids=x).logits, -1)[:, 8:]
    conf, guess = probs.max(-1)
    first = conf.argmax(-1)
    one = fp32.diffusion_generate(prompt, max_new_tokens=8, steps=8)
    assert torch.equal(one[torch.arange(2), 8 + first], guess[torch.arange(2), first])


def test_export_registers_the_model_in_mlflow(trained):
    from mlflow.tracking import MlflowClient

    result = trained["result"]
    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    versions = client.search_model_versions("name='hfrun'")
    assert len(versions) == 1 and versions[0].run_id == result.run_id
    assert versions[0].source.endswith("/hf_model")
    listed = {Path(a.path).name for a in client.list_artifacts(result.run_id, "hf_model")}
    assert {"config.json", "model.safetensors", "modeling_dlm.py", "README.md"} <= listed
    card = (trained["hf"] / "README.md").read_text()
    val = client.get_run(result.run_id).data.metrics["val/ce_masked"]
    assert f"| `val/ce_masked` | {val:.6g} |" in card


def test_export_of_a_run_whose_mlflow_store_moved(trained, tmp_path, capsys):
    store = trained["out"] / "mlflow.db"
    store.rename(tmp_path / "moved.db")
    try:
        hf = export_checkpoint(trained["result"].checkpoint, tmp_path / "hf")
    finally:
        (tmp_path / "moved.db").rename(store)
    assert "not found in sqlite:///" in capsys.readouterr().out
    assert "Not available: no MLflow run was found" in (hf / "README.md").read_text()
    assert not (trained["out"] / "mlflow.db-journal").exists() and store.is_file()


def _cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from launcher.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def test_export_bad_input_is_a_clear_error(trained, tmp_path):
    ckpt = trained["result"].checkpoint
    no_marker = tmp_path / "no-marker"
    shutil.copytree(ckpt, no_marker)
    (no_marker / "COMPLETE.json").unlink()
    code, err = _cli("export", str(no_marker), str(tmp_path / "o1"))
    assert code == 2 and "incomplete checkpoint (no COMPLETE.json" in err

    missing_shard = tmp_path / "missing-shard"
    converted = convert_checkpoint(ckpt, missing_shard, tp=2, pp=2)
    (converted / "shards" / "rank-00003.safetensors").unlink()
    code, err = _cli("export", str(converted), str(tmp_path / "o2"))
    assert code == 2 and "shards/rank-00003.safetensors' listed in COMPLETE.json is missing" in err

    no_config = tmp_path / "no-config"
    shutil.copytree(ckpt, no_config)
    (no_config / "config.yaml").unlink()
    code, err = _cli("export", str(no_config), str(tmp_path / "o3"))
    assert code == 2 and f"{no_config}: no config.yaml" in err

    code, err = _cli("export", str(ckpt), str(tmp_path / "o4"), "--data", str(tmp_path))
    assert code == 2 and "no manifest.json" in err and "--data" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert not list(tmp_path.glob("*.partial"))  # failed exports leave nothing behind

    code, err = _cli("export", str(ckpt), str(trained["hf"]), "--no-register")
    assert code == 2 and "already exists and is not empty; pass --overwrite" in err
    assert (trained["hf"] / "config.json").is_file()


def test_export_of_a_real_tp2_pp2_run_equals_the_single_process_export(
    runtime, demo_data, tmp_path
):
    """4 torchrun processes train at TP=2 x PP=2 (each rank writes its own shard); its export
    equals the export of the same config trained in one process, within the parameter tolerance
    of the parallel tests (1e-4; the runs differ only in the order of floating-point sums)."""
    from test_parallel import PARAM_ATOL, launch, overrides

    layout = {"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2}
    (result,) = launch(
        4, [{"overrides": overrides(demo_data, tmp_path, "tp2pp2", **layout)}], tmp_path
    )
    single = train(load_config(TINY, overrides(demo_data, tmp_path, "single")))
    parallel_ckpt = Path(result["checkpoint"])
    assert len(list((parallel_ckpt / "shards").iterdir())) == 4
    a = export_checkpoint(parallel_ckpt, tmp_path / "hf-tp2pp2", register=False)
    b = export_checkpoint(single.checkpoint, tmp_path / "hf-single", register=False)
    got, want = _tensors(a), _tensors(b)
    assert sorted(got) == sorted(want)
    worst = max((got[n] - want[n]).abs().max().item() for n in got)
    assert worst <= PARAM_ATOL, f"max parameter difference {worst:.3g}"
    half = export_checkpoint(
        single.run_dir / "checkpoints" / "step_00000003", tmp_path / "hf-half", register=False
    )
    earlier = _tensors(half)
    moved = max((want[n] - earlier[n]).abs().max().item() for n in want)
    assert moved > 10 * PARAM_ATOL  # the last 3 steps alone move weights far beyond the tolerance


def test_export_streams_one_layer_at_a_time(trained, tmp_path, monkeypatch):
    """The exporter never holds the model: whenever a shard is written, only a few canonical
    tensors are still alive (those of the shard and of the layer being converted), and each is
    read from the checkpoint exactly once. The streamed export loads with equal weights."""
    import weakref

    import pretrain.hf.export as export

    reads: list[str] = []
    alive: list[weakref.ref] = []
    at_flush: list[int] = []
    full, save = CheckpointReader.full, export.save_file

    def tracked_full(self, name, kind="param"):
        tensor = full(self, name, kind)
        reads.append(name)
        alive.append(weakref.ref(tensor))
        return tensor

    def tracked_save(tensors, path, metadata=None):
        at_flush.append(sum(ref() is not None for ref in alive))
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(CheckpointReader, "full", tracked_full)
    monkeypatch.setattr(export, "save_file", tracked_save)
    checkpoint = trained["result"].checkpoint
    out = export_checkpoint(checkpoint, tmp_path / "streamed", max_shard_size="1B", register=False)
    names = CheckpointReader(checkpoint).names()
    assert sorted(reads) == sorted(names)  # every canonical tensor read once
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) == len(at_flush) > len(names)  # one tensor per shard at 1 byte
    # the shard's tensor, the next one, and the fused qkv / fc1 they are split from
    assert max(at_flush) <= 4 < len(names), at_flush
    from safetensors.torch import load_file

    streamed = {k: v for shard in shards for k, v in load_file(shard).items()}
    reference = {}
    for file in sorted(trained["hf"].glob("*.safetensors")):
        reference |= load_file(file)
    assert streamed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(streamed[name], tensor), name
    # the model card counts parameters from the config, without reading tensors: the same count
    total = sum(t.numel() for t in streamed.values())
    assert f"| parameters | {total / 1e6:.2f}M |" in (out / "README.md").read_text()
