"""Building blocks around Megatron-core's `TransformerLayer`: the layer spec, RMSNorm and RoPE.

The spec is written out explicitly instead of taken from `get_gpt_layer_local_spec` because
(a) attention must be bidirectional and use our `CoreAttention`, (b) Megatron's local norm wrapper
refuses sequence parallelism, and (c) its `RotaryEmbedding` moves buffers to CUDA unconditionally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from pretrain.model.attention import CoreAttention, RopeTable


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, normalised in fp32 (bf16 sums of squares drift).

    Takes Megatron's norm constructor arguments so it can sit in a layer spec. The weight is
    replicated across tensor-parallel ranks. Under sequence parallelism each TP rank normalises
    only its slice of the sequence, so its weight gradient is a partial sum; Megatron leaves that
    to its own DDP, which we do not use (DeepSpeed does not know about it). Instead the weight
    enters through `copy_to_tensor_model_parallel_region`: identity forward, all-reduce over the
    TP group backward, so every TP rank holds the full gradient before DeepSpeed sees it.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.sequence_parallel = config.sequence_parallel
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.sequence_parallel:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.to(x.dtype) * weight


class RotaryEmbedding(torch.nn.Module):
    """RoPE's cos/sin table in Megatron's layout, [s, 1, 1, head_dim], of the angles
    angle_{p,j} = p * base^(-2j/d), made once per sequence length and dtype and kept.

    The two halves repeat the same frequencies (non-interleaved, "rotate_half" convention, as in
    Llama); `pretrain.model.attention.apply_rope` rotates q and k with it. The table is made in
    fp32 and stored in the dtype asked for (the activations'), as Megatron casts cos and sin to
    q's dtype before rotating: every layer then uses (and autograd saves) the same two tensors.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cache: tuple[tuple, RopeTable] | None = None

    def forward(self, seq_len: int, dtype: torch.dtype = torch.float32) -> RopeTable:
        device = self.inv_freq.device
        key = (seq_len, device, dtype)
        if self._cache is None or self._cache[0] != key:
            positions = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq.float())  # [s, d/2]
            emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [s, 1, 1, d]
            self._cache = (key, RopeTable(emb.cos().to(dtype), emb.sin().to(dtype)))
        return self._cache[1]


class RowParallelLinearWithGroup(RowParallelLinear):
    """Megatron's RowParallelLinear, passing its own tensor-parallel group to the matmul.

    Megatron-core 0.16's forward passes `tp_group=None`, which makes the matmul look the default
    group up and warn on every call; under torch.compile that lookup (`torch.distributed.get_rank`)
    breaks the graph twice per layer, and each break is one more host round trip between
    kernels. The group is the same one the layer was built with, so the result is identical.
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def transformer_layer_spec(attention_backend: str, mlp=None) -> ModuleSpec:
    """Pre-norm layer: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x)), all projections bias-free.
    `mlp` replaces the SwiGLU MLP's spec (`build_layer`'s placeholder for an MoE block)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                # no_mask: attention is bidirectional unless an objective passes a boolean mask.
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(
                        module=CoreAttention, params={"backend": attention_backend}
                    ),
                    linear_proj=RowParallelLinearWithGroup,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp
            or ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinearWithGroup
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def build_layer(model, config, layer_number: int, moe_groups=None) -> TransformerLayer:
    """Transformer layer `layer_number` (1-based) of `model`: dense, or with an MoE block in its
    MLP slot when `model.moe` routes that layer.

    The MoE block is put into the layer after it is built (the spec holds a placeholder):
    TransformerLayer hands process groups only to Megatron's own MLP classes, so a spec naming
    ours would build it without them (and warn).
    """
    from megatron.core.transformer.identity_op import IdentityOp

    moe = model.moe.is_moe_layer(layer_number - 1)
    spec = transformer_layer_spec(model.attention_backend, mlp=IdentityOp if moe else None)
    layer = build_module(spec, config=config, layer_number=layer_number)
    if moe:
        from pretrain.model.moe import MoEBlock, expert_groups

        groups = moe_groups if moe_groups is not None else expert_groups()
        layer.mlp = MoEBlock(config, groups, linear_fc2=RowParallelLinearWithGroup)
        layer.mlp.set_layer_number(layer_number)
    return layer
