"""Upcycling: an MoE model's first weights from a dense checkpoint (`train.init_from`).

    dense layer i:  x + SwiGLU_i(RMSNorm(x))
    MoE layer i:    x + sum_{e in top-k} p_e(x) SwiGLU_i(RMSNorm(x))   (every expert = SwiGLU_i)

Every routed expert of an MoE layer starts as a copy of that layer's dense MLP and the router
from the seeded canonical init (`train.seed`), so while the k routing weights sum to 1
(softmax over the top-k logits, or sigmoid scores normalised over k > 1) the upcycled model
computes the dense model's function exactly, whatever the router picks; training then moves
the experts apart. Attention, norms, embedding and head are the dense checkpoint's. Works for
any dense checkpoint of ours, including one written by `dlm import` (a Hugging Face causal LM):
AR -> MoE-DLM and dense-DLM -> MoE-DLM.

Upcycling needs `model.moe.expert_ffn_hidden_size` equal to the dense `model.ffn_hidden_size`
and no shared experts (a copy of the MLP in both would double it).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from pretrain.checkpoint.format import CheckpointReader, canonical_names
from pretrain.config import Config, MoEConfig
from pretrain.errors import ConfigError
from pretrain.model.sharding import init_value, shard_spec

_EXPERT = re.compile(r"(layers\.\d+\.mlp\.)experts\.\d+\.(linear_fc[12]\.weight)")
_ROUTER = re.compile(r"layers\.\d+\.mlp\.router\.weight")


class UpcycledReader:
    """A dense checkpoint read as the MoE model's weights (the reader `load_weights` takes)."""

    def __init__(self, dense: CheckpointReader, cfg: Config):
        self.dense, self.path, self.cfg = dense, dense.path, cfg

    def local(self, name: str, kind: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        m = self.cfg.model
        if match := _EXPERT.fullmatch(name):
            return self.dense.local("".join(match.groups()), kind, tp_rank, tp_size)
        if _ROUTER.fullmatch(name):
            assert shard_spec(name).dim is None  # replicated: the whole tensor on every rank
            shape = (m.moe.num_experts, m.hidden_size)
            return init_value(
                name, shape, seed=self.cfg.train.seed, std=m.init_std, num_layers=m.num_layers
            )
        return self.dense.local(name, kind, tp_rank, tp_size)


def open_init_checkpoint(path: Path, cfg: Config, *, verify: bool):
    """`train.init_from`: the checkpoint's reader when it holds this model; for an MoE model
    and a checkpoint of its dense counterpart, the upcycling reader; else the mismatch error."""
    from pretrain.checkpoint.manager import open_checkpoint, verify_checkpoint

    model = cfg.model
    if model.moe.enabled:
        dense = dataclasses.replace(model, moe=MoEConfig())
        verify_checkpoint(path, hashes=verify)
        reader = CheckpointReader(path)
        if reader.names() == canonical_names(dense):
            check_upcycling(cfg)
            return UpcycledReader(reader, cfg)
        reader.check_matches(canonical_names(model))
        return reader
    return open_checkpoint(path, model=model, verify=verify)


def check_upcycling(cfg: Config) -> None:
    moe, f = cfg.model.moe, cfg.model.ffn_hidden_size
    if (moe.expert_ffn_hidden_size or f) != f:
        raise ConfigError(
            f"train.init_from {cfg.train.init_from}: upcycling a dense checkpoint needs "
            f"model.moe.expert_ffn_hidden_size ({moe.expert_ffn_hidden_size}) equal to "
            f"model.ffn_hidden_size ({f}) or null: each expert starts as the dense MLP"
        )
    if moe.shared_expert_ffn_hidden_size:
        raise ConfigError(
            f"train.init_from {cfg.train.init_from}: upcycling a dense checkpoint needs "
            "model.moe.shared_expert_ffn_hidden_size 0 (the dense MLP goes into every expert)"
        )
