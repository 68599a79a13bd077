"""Canonical parameter names <-> Hugging Face (Llama-style) names, with the fused layouts split.

Our canonical tensors (`pretrain.model.sharding`) follow Megatron-core's fused layouts:

    linear_qkv.weight [G * (H/G + 2) * d, h]   group-major: for each KV group g the rows are
                                               [q heads of g (H/G * d) ; k_g (d) ; v_g (d)]
    linear_fc1.weight [2 * f, h]               [gate ; up]  (SwiGLU: silu(gate(x)) * up(x))

(H query heads, G KV groups, head dim d.) The exported model, like Llama, keeps q/k/v and gate/up
as separate projections, so the same mapping serves export (ours -> HF) and import of Llama/Qwen2
weights (HF -> ours). Everything else is a rename. MoE layers (export only) name their router
`mlp.gate`, routed expert e `mlp.experts.e.{gate,up,down}_proj` and the shared experts
`mlp.shared_experts.*`, as Mixtral/Qwen-MoE-style checkpoints do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from pretrain.config.schema import ModelConfig

_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
}
_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "head.final_norm.weight": "model.norm.weight",
    "head.output_layer.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int
    moe_layers: tuple[int, ...] = ()
    """Indices of the layers whose MLP is a mixture of experts."""
    num_experts: int = 0
    shared_experts: bool = False
    shared_expert_gate: bool = False
    expert_bias: bool = False

    @classmethod
    def of(cls, model: ModelConfig) -> Shape:
        moe = model.moe
        return cls(
            num_layers=model.num_layers,
            num_heads=model.num_attention_heads,
            num_groups=model.num_query_groups or model.num_attention_heads,
            head_dim=model.hidden_size // model.num_attention_heads,
            moe_layers=tuple(i for i in range(model.num_layers) if moe.is_moe_layer(i)),
            num_experts=moe.num_experts,
            shared_experts=bool(moe.shared_expert_ffn_hidden_size),
            shared_expert_gate=moe.shared_expert_gate,
            expert_bias=moe.expert_bias_update_rate > 0,
        )


def split_qkv(qkv: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's group-major fused QKV [G*(H/G+2)*d, h] -> q [H*d, h], k [G*d, h], v [G*d, h]."""
    per_group = shape.num_heads // shape.num_groups
    d = shape.head_dim
    grouped = qkv.view(shape.num_groups, (per_group + 2) * d, -1)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, qkv.shape[1]), k.reshape(-1, qkv.shape[1]), v.reshape(-1, qkv.shape[1])


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    g, d = shape.num_groups, shape.head_dim
    h = q.shape[1]
    grouped = torch.cat([q.view(g, -1, h), k.view(g, d, h), v.view(g, d, h)], dim=1)
    return grouped.reshape(-1, h)


def to_hf_items(
    canonical: Mapping[str, torch.Tensor], shape: Shape
) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical tensors -> `DLMForMaskedLM` / Llama-style (name, tensor) pairs, one layer at a
    time: each canonical tensor is looked up once, when its layer comes, so with a lazy
    `canonical` (`pretrain.hf.source.CanonicalState`) only a layer's tensors are in memory."""
    for ours, hf in _TOP.items():
        yield hf, canonical[ours].contiguous()
    for i in range(shape.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for src, dst in _RENAMES.items():
            yield hf + dst, canonical[ours + src].contiguous()
        q, k, v = split_qkv(canonical[ours + "self_attention.linear_qkv.weight"], shape)
        yield hf + "self_attn.q_proj.weight", q.contiguous()
        yield hf + "self_attn.k_proj.weight", k.contiguous()
        yield hf + "self_attn.v_proj.weight", v.contiguous()
        if i in shape.moe_layers:
            yield from _moe_items(canonical, ours + "mlp.", hf + "mlp.", shape)
            continue
        yield hf + "mlp.down_proj.weight", canonical[ours + "mlp.linear_fc2.weight"].contiguous()
        yield from _swiglu_items(canonical[ours + "mlp.linear_fc1.weight"], hf + "mlp.")


def _swiglu_items(fc1: torch.Tensor, hf: str) -> Iterator[tuple[str, torch.Tensor]]:
    gate, up = fc1.chunk(2, dim=0)
    yield hf + "gate_proj.weight", gate.contiguous()
    yield hf + "up_proj.weight", up.contiguous()


def _moe_items(
    canonical: Mapping[str, torch.Tensor], ours: str, hf: str, shape: Shape
) -> Iterator[tuple[str, torch.Tensor]]:
    """One MoE MLP: router -> `gate`, expert e -> `experts.e.{gate,up,down}_proj`, shared
    experts -> `shared_experts.*` (+ `shared_expert_gate`), the expert bias -> `expert_bias`."""
    yield hf + "gate.weight", canonical[ours + "router.weight"].contiguous()
    if shape.expert_bias:
        yield hf + "expert_bias", canonical[ours + "router.expert_bias"].contiguous()
    experts = [(f"experts.{e}.", f"experts.{e}.") for e in range(shape.num_experts)]
    if shape.shared_experts:
        experts.append(("shared_experts.", "shared_experts."))
        if shape.shared_expert_gate:
            gate = canonical[ours + "shared_experts.gate_weight"]
            yield hf + "shared_expert_gate.weight", gate.contiguous()
    for src, dst in experts:
        yield hf + dst + "down_proj.weight", canonical[ours + src + "linear_fc2.weight"]
        yield from _swiglu_items(canonical[ours + src + "linear_fc1.weight"], hf + dst)


def from_hf(hf: dict[str, torch.Tensor], shape: Shape) -> dict[str, torch.Tensor]:
    """Llama-style state dict (q/k/v, gate/up separate) -> canonical state dict."""
    out = {ours: hf[name] for ours, name in _TOP.items()}
    for i in range(shape.num_layers):
        ours, src = f"layers.{i}.", f"model.layers.{i}."
        for dst, name in _RENAMES.items():
            out[ours + dst] = hf[src + name]
        out[ours + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
        attn = src + "self_attn."
        out[ours + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[attn + "q_proj.weight"],
            hf[attn + "k_proj.weight"],
            hf[attn + "v_proj.weight"],
            shape,
        )
        out[ours + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0
        )
    return {name: t.contiguous() for name, t in out.items()}
