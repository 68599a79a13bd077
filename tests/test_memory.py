"""The memory planner: exact parameter counts, sharding factors, activation formula, CLI table."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch

from pretrain.config import ModelConfig, load_config
from pretrain.errors import ConfigError
from pretrain.parallel.memory import (
    Layout,
    add_plan_arguments,
    head_activation_bytes,
    layer_activation_bytes,
    layers_per_stage,
    parameter_counts,
    per_gpu_memory,
    rope_table_bytes,
    run_plan,
    stage_parameter_counts,
)

VOCAB = 300


def small(**kw) -> ModelConfig:
    base = dict(hidden_size=64, num_layers=3, num_attention_heads=4, ffn_hidden_size=96)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("groups", [None, 2], ids=["mha", "gqa"])
def test_parameter_counts_equal_the_built_model(runtime, groups):
    from pretrain.model.parallelize import build_model

    cfg = small(num_query_groups=groups)
    model = build_model(cfg, vocab_size=VOCAB, mask_token_id=VOCAB - 1, seed=0)
    counts = parameter_counts(cfg, VOCAB)
    real = sum(p.numel() for p in model.parameters())
    assert counts["total"] == real, (counts, real)
    assert counts["per_layer"] == sum(p.numel() for p in model.layers[0].parameters())
    assert counts["embedding"] == sum(p.numel() for p in model.embedding.parameters())
    assert counts["head"] == sum(p.numel() for p in model.head.parameters())


def test_presets_have_their_reported_sizes():
    big = parameter_counts(load_config("configs/llada-8b.yaml").model, 126464)["total"]
    small_ = parameter_counts(load_config("configs/llada-1b.yaml").model, 126464)["total"]
    assert 7.9e9 < big < 8.1e9, f"llada-8b has {big:,} parameters"
    assert 1.0e9 < small_ < 2.0e9, f"llada-1b has {small_:,} parameters"


@pytest.mark.parametrize("num_layers,pp", [(22, 4), (32, 3), (7, 4), (5, 2), (8, 8), (32, 2)])
def test_stage_split_is_deepspeeds_balanced_partition(num_layers, pp):
    from deepspeed.runtime.utils import partition_balanced

    weights = [0] + [1] * num_layers + [0]  # embedding, layers, head as in a type: partition
    parts = partition_balanced(weights, pp)
    expected = [sum(weights[parts[k] : parts[k + 1]]) for k in range(pp)]
    assert layers_per_stage(num_layers, pp) == expected


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2, 3])
def test_tp_and_pp_shards_recover_the_total(tp, pp):
    cfg = small(num_layers=7, num_query_groups=4)
    stages = stage_parameter_counts(cfg, VOCAB, tp, pp)
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size  # replicated on every TP rank
    assert sum(stages) * tp - (tp - 1) * norms == parameter_counts(cfg, VOCAB)["total"]
    est = per_gpu_memory(cfg, VOCAB, Layout(tp, pp, 1, zero_stage=0))
    assert est.params_per_gpu == stages[est.stage]
    assert est.params == 2 * stages[est.stage] and est.optimizer == 12 * stages[est.stage]


def test_zero_stages_shard_exactly_what_they_should():
    cfg = load_config("configs/llada-8b.yaml").model
    layouts = {z: Layout(1, 1, 8, zero_stage=z, seq_len=4096) for z in range(4)}
    est = {z: per_gpu_memory(cfg, 126464, lay) for z, lay in layouts.items()}
    n = est[0].params_per_gpu
    assert n == parameter_counts(cfg, 126464)["total"]
    assert (est[0].params, est[0].grads, est[0].optimizer) == (2 * n, 2 * n, 12 * n)
    assert (est[1].params, est[1].grads, est[1].optimizer) == (2 * n, 2 * n, 12 * n // 8)
    assert (est[2].params, est[2].grads, est[2].optimizer) == (2 * n, 2 * n // 8, 12 * n // 8)
    assert (est[3].params, est[3].grads, est[3].optimizer) == (2 * n // 8, 2 * n // 8, 12 * n // 8)
    assert len({e.activations for e in est.values()}) == 1
    fp32 = per_gpu_memory(cfg, 126464, replace(layouts[1], precision="fp32"))
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * n, 4 * n, 8 * n // 8)


def test_activations_respond_to_checkpointing_tp_and_pipeline():
    cfg = load_config("configs/llada-8b.yaml").model
    base = Layout(1, 1, 8, micro_batch_size=2, seq_len=4096)
    full = per_gpu_memory(cfg, 126464, base).activations
    ckpt = per_gpu_memory(cfg, 126464, replace(base, activation_checkpointing=True)).activations
    assert ckpt < full / 4, (ckpt, full)
    assert per_gpu_memory(cfg, 126464, replace(base, tp=2, dp=4)).activations < full
    doubled = per_gpu_memory(cfg, 126464, replace(base, micro_batch_size=4)).activations
    # all of it doubles but the sparse head's one chunk of logits in flight (1 GiB of fp32)
    _, chunk = head_activation_bytes(cfg, 126464, 2, 4096, 1, 2)
    assert chunk == (1 << 30) // (4 * 126464) * 126464 * 10
    assert doubled == pytest.approx(2 * full - chunk, rel=0.01)
    # 1F1B: the first stage holds pp micro-batches of its layers, so it is the heaviest.
    piped = per_gpu_memory(cfg, 126464, replace(base, tp=4, pp=2, dp=1))
    assert piped.stage == 0 and piped.stage_name == "first"


def _saved_bytes(model: torch.nn.Module, tokens: torch.Tensor, sparse: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward (weights and buffers
    excluded); `sparse`: through the sparse head with every position a loss position."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        positions = torch.ones_like(tokens, dtype=torch.bool) if sparse else None
        model(tokens, targets=tokens, loss_positions=positions)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("groups", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["full", "ckpt"])
@pytest.mark.parametrize(
    "head",
    [
        {"sparse_output": False},
        {"sparse_output": True, "sparse_output_recompute": True},
        {"sparse_output": True, "sparse_output_recompute": False},
    ],
    ids=["dense-head", "sparse-head-recompute", "sparse-head-stored"],
)
def test_activation_formula_equals_saved_tensors(runtime, dtype, groups, ckpt, head):
    from pretrain.model.parallelize import build_model

    cfg = small(num_query_groups=groups, activation_checkpointing=ckpt, **head)
    model = build_model(cfg, vocab_size=VOCAB, mask_token_id=VOCAB - 1, params_dtype=dtype)
    model.train()
    b, s, e = 2, 24, 2 if dtype == torch.bfloat16 else 4
    tokens = torch.randint(0, VOCAB - 1, (b, s))
    measured = _saved_bytes(model, tokens, cfg.sparse_output)
    v_pad = parameter_counts(cfg, VOCAB)["padded_vocab"]
    head, _ = head_activation_bytes(cfg, v_pad, b, s, 1, e)
    per_layer = e * s * b * cfg.hidden_size if ckpt else layer_activation_bytes(cfg, b, s, 1, e)
    table = 0 if ckpt else rope_table_bytes(cfg, s, e)  # shared by the layers
    assert measured == cfg.num_layers * per_layer + table + head + 8 * s * b  # + token ids


def _plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


def test_run_plan_prints_the_layouts(capsys):
    assert _plan(["configs/llada-1b.yaml", "--layout", "1x1x8:3", "--layout", "4x2x1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| llada-1b")]
    assert len(rows) == 2 and "| 1x1x8 | 8 | 3 |" in rows[0] and "| 4x2x1 | 8 | 1 |" in rows[1]
    assert "| first |" in rows[1] and "estimates" in out
    _plan(["configs/llada-1b.yaml"])  # defaults: 8x1x1 does not fit 4 KV heads, so it is skipped
    out = capsys.readouterr().out
    assert "| 4x2x8 | 64 |" in out and "| 8x1x1 |" not in out and "skipped layout 8x1x1" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["configs/llada-1b.yaml", "--layout", "4x2"],
        ["configs/llada-1b.yaml", "--layout", "2x1x4:5"],
        ["configs/llada-1b.yaml", "--layout", "8x1x1"],  # num_query_groups 4 % 8
        ["configs/llada-1b.yaml", "--layout", "1x2x4:3"],  # pipeline + ZeRO-3
        ["configs/tiny.yaml"],  # vocab_size null and no --vocab-size
    ],
)
def test_bad_layouts_raise_config_error(argv):
    with pytest.raises(ConfigError):
        _plan(argv)


def test_the_planners_chunk_size_is_the_heads():
    from pretrain.model import transformer
    from pretrain.parallel import memory

    assert memory.CE_CHUNK_BYTES == transformer.CE_CHUNK_BYTES
