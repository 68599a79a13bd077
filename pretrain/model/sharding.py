"""Layout-independent parameter identity: canonical names, tensor-parallel shard specs, init.

The *canonical* form of a model is the state dict of a single-device (TP=1, PP=1) `DLMTransformer`:
`embedding.word_embeddings.weight`, `layers.{i}.self_attention.linear_qkv.weight`, ...,
`head.output_layer.weight`. Every layout holds, per rank, a tensor-parallel shard of some of these
tensors; `ShardSpec` says how a full tensor maps to its shards. Initialisation, checkpoints, layout
conversion and export all go through this one mapping, so a model is the same model in every
layout (same seed -> same weights; a checkpoint loads into any layout).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    dim: int | None
    """Dimension split across TP ranks; None: replicated on every TP rank."""
    glu: bool = False
    """SwiGLU fc1 is [gate; up]: each TP rank holds [gate_r; up_r], not a contiguous block."""


# Megatron-core splits: column-parallel weights (fused QKV, fc1, vocab rows) by output rows
# (dim 0), row-parallel weights (attention output, fc2) by input columns (dim 1). The fused QKV is
# stored group-major ([q_g..., k_g, v_g] per KV group), so contiguous row blocks are whole groups.
_SPECS: list[tuple[re.Pattern, ShardSpec]] = [
    (re.compile(r"embedding\.word_embeddings\.weight"), ShardSpec(0)),
    (re.compile(r"layers\.\d+\.self_attention\.linear_qkv\.weight"), ShardSpec(0)),
    (re.compile(r"layers\.\d+\.self_attention\.linear_proj\.weight"), ShardSpec(1)),
    (re.compile(r"layers\.\d+\.mlp\.linear_fc1\.weight"), ShardSpec(0, glu=True)),
    (re.compile(r"layers\.\d+\.mlp\.linear_fc2\.weight"), ShardSpec(1)),
    (re.compile(r"layers\.\d+\.(input_layernorm|pre_mlp_layernorm)\.weight"), ShardSpec(None)),
    (re.compile(r"head\.final_norm\.weight"), ShardSpec(None)),
    (re.compile(r"head\.output_layer\.weight"), ShardSpec(0)),
    # MoE layers: router (and its expert bias, a buffer) replicated; routed experts (named by
    # their global index) and shared experts split like the dense MLP
    (re.compile(r"layers\.\d+\.mlp\.router\.(weight|expert_bias)"), ShardSpec(None)),
    (re.compile(r"layers\.\d+\.mlp\.shared_experts\.gate_weight"), ShardSpec(None)),
    (
        re.compile(r"layers\.\d+\.mlp\.(experts\.\d+|shared_experts)\.linear_fc1\.weight"),
        ShardSpec(0, glu=True),
    ),
    (
        re.compile(r"layers\.\d+\.mlp\.(experts\.\d+|shared_experts)\.linear_fc2\.weight"),
        ShardSpec(1),
    ),
]
_ONES = re.compile(r".*(layernorm|final_norm)\.weight")
"""Initialised to 1 (norm weights); `_ZEROS` to 0 (the router's expert bias); the rest N(0, std)."""
_ZEROS = re.compile(r".*\.expert_bias")
_LOCAL_EXPERT = re.compile(r"(.*\.mlp\.experts)\.local_experts\.(\d+)\.(.+)")


def shard_spec(name: str) -> ShardSpec:
    for pattern, spec in _SPECS:
        if pattern.fullmatch(name):
            return spec
    raise KeyError(f"no tensor-parallel shard spec for parameter '{name}'")


def full_shape(name: str, local_shape: torch.Size, tp_size: int) -> tuple[int, ...]:
    spec = shard_spec(name)
    shape = list(local_shape)
    if spec.dim is not None:
        shape[spec.dim] *= tp_size
    return tuple(shape)


def shard(full: torch.Tensor, spec: ShardSpec, rank: int, size: int) -> torch.Tensor:
    """The piece of the full tensor that TP rank `rank` of `size` holds."""
    if spec.dim is None or size == 1:
        return full
    if spec.glu:
        gate, up = full.chunk(2, dim=spec.dim)
        return torch.cat(
            [gate.chunk(size, spec.dim)[rank], up.chunk(size, spec.dim)[rank]], spec.dim
        )
    return full.chunk(size, dim=spec.dim)[rank]


def unshard(shards: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from all TP ranks' pieces, in rank order."""
    if spec.dim is None or len(shards) == 1:
        return shards[0]
    if spec.glu:
        halves = [s.chunk(2, dim=spec.dim) for s in shards]
        gate = torch.cat([h[0] for h in halves], spec.dim)
        up = torch.cat([h[1] for h in halves], spec.dim)
        return torch.cat([gate, up], spec.dim)
    return torch.cat(shards, dim=spec.dim)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/init/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def init_value(name: str, shape: tuple[int, ...], *, seed: int, std: float, num_layers: int):
    """The full initial value of canonical parameter `name`, drawn from its own seeded stream.

    Norm weights are 1, the router's expert bias 0; weights feeding the residual stream
    (attention output, fc2 of the MLPs and experts) use std / sqrt(2 * num_layers) (GPT-2 /
    Megatron scaling); all other weights (the router's too) N(0, std).
    """
    if _ONES.fullmatch(name):
        return torch.ones(shape)
    if _ZEROS.fullmatch(name):
        return torch.zeros(shape)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * num_layers)
    return torch.randn(shape, generator=_generator(seed, name)) * std


def canonical_expert_name(name: str, *, ep_rank: int, local_experts: int) -> str:
    """A module's name for one of its routed experts -> the canonical name, with the expert's
    global index: `layers.3.mlp.experts.local_experts.1.linear_fc1.weight` on expert-parallel
    rank 2 of 4 experts per rank -> `layers.3.mlp.experts.9.linear_fc1.weight`. Other names
    pass through."""
    match = _LOCAL_EXPERT.fullmatch(name)
    if match is None:
        return name
    prefix, local, rest = match.groups()
    return f"{prefix}.{ep_rank * local_experts + int(local)}.{rest}"


_EXPERT = re.compile(r"layers\.\d+\.mlp\.experts\.(\d+)\..+")


def expert_index(name: str) -> int | None:
    """The global index of the routed expert a canonical name belongs to (None: not an
    expert's)."""
    match = _EXPERT.fullmatch(name)
    return None if match is None else int(match.group(1))


def mark_tensor_parallel(named_params) -> None:
    """Set Megatron's tensor-parallel attributes on every parameter from its shard spec.

    Megatron sets them inside its own initialisation, which we switch off. DeepSpeed reads them
    (`tensor_model_parallel`) to count a TP-split parameter's gradient on every TP rank but a
    replicated one only once in the global gradient norm; without them clipping is wrong.
    """
    for name, param in named_params:
        spec = shard_spec(name)
        param.tensor_model_parallel = spec.dim is not None
        param.partition_dim = spec.dim if spec.dim is not None else -1
        param.partition_stride = 1


@torch.no_grad()
def initialize(
    named_params, *, seed: int, std: float, num_layers: int, tp_rank: int, tp_size: int
) -> None:
    """Fill each (canonical name, local parameter) with its shard of the canonical init.

    Every rank draws the full tensor and keeps its shard: the price of identical weights in every
    layout is generating `tp_size` times more random numbers than the rank keeps.
    """
    for name, param in named_params:
        full = init_value(
            name,
            full_shape(name, param.shape, tp_size),
            seed=seed,
            std=std,
            num_layers=num_layers,
        )
        param.copy_(shard(full, shard_spec(name), tp_rank, tp_size))
