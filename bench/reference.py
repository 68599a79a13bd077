"""The plain reference: the DLM architecture and masked-diffusion loss in ~100 lines of PyTorch.

Same architecture as `pretrain.model` (RMSNorm, grouped-query attention through SDPA, RoPE,
SwiGLU, no biases, bidirectional), logits at every position, the per-token weighted masked
cross-entropy, fp32 weights under bf16 autocast, fused AdamW; `torch.compile` is applied by the
benchmark. `load_canonical` copies a trained/initialised `pretrain` model into it, so both compute
the same function (checked by `tests/test_bench_reference.py` and by the GPU benchmark).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, hd]; rotate-half RoPE (the two halves of each head are the pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, d: int, heads: int, groups: int, ffn: int, eps: float):
        super().__init__()
        self.heads, self.groups, self.hd = heads, groups, d // heads
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.q = nn.Linear(d, heads * self.hd, bias=False)
        self.kv = nn.Linear(d, 2 * groups * self.hd, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, 2 * ffn, bias=False)  # [gate; up]
        self.fc2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):  # x [b, s, d]
        b, s, d = x.shape
        h = self.norm1(x)
        q = rope(self.q(h).view(b, s, self.heads, self.hd), cos, sin)
        k, v = self.kv(h).view(b, s, 2, self.groups, self.hd).unbind(2)
        k = rope(k, cos, sin)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
        )  # [b, heads, s, hd], every position sees every position
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class ReferenceDLM(nn.Module):
    def __init__(
        self, *, vocab, padded_vocab, d, layers, heads, groups, ffn, rope_base, eps, mask_id
    ):
        super().__init__()
        self.embed = nn.Embedding(padded_vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, groups, ffn, eps) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=eps)
        self.head = nn.Linear(d, padded_vocab, bias=False)
        hd = d // heads
        self.register_buffer(
            "inv_freq", 1.0 / rope_base ** (torch.arange(0, hd, 2).float() / hd), persistent=False
        )
        excluded = torch.arange(padded_vocab) >= vocab
        excluded[mask_id] = True  # the mask token is never a target
        self.register_buffer("excluded", excluded, persistent=False)

    def forward(self, x_t, x0, loss_weights):
        """x_t, x0 [b, s]; loss_weights [b, s] (0 where visible) -> scalar loss per token slot."""
        pos = torch.arange(x_t.shape[1], device=x_t.device).float()
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]  # [1, s, 1, hd]
        cos, sin = emb.cos(), emb.sin()
        h = self.embed(x_t)
        for block in self.blocks:
            h = block(h, cos, sin)
        logits = self.head(self.norm(h)).float().masked_fill(self.excluded, float("-inf"))
        ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none")
        return (ce.view_as(x0) * loss_weights).sum() / x0.numel()


def build_reference(model_cfg, *, vocab: int, padded_vocab: int, mask_id: int) -> ReferenceDLM:
    return ReferenceDLM(
        vocab=vocab,
        padded_vocab=padded_vocab,
        d=model_cfg.hidden_size,
        layers=model_cfg.num_layers,
        heads=model_cfg.num_attention_heads,
        groups=model_cfg.num_query_groups or model_cfg.num_attention_heads,
        ffn=model_cfg.ffn_hidden_size,
        rope_base=model_cfg.rope_base,
        eps=model_cfg.norm_eps,
        mask_id=mask_id,
    )


@torch.no_grad()
def load_canonical(ref: ReferenceDLM, canonical: dict[str, torch.Tensor]) -> None:
    """Copy a `pretrain` model's canonical (single-device) state into the reference; Megatron's
    group-major fused QKV is split by the same mapping the Hugging Face export uses."""
    from pretrain.hf.mapping import Shape, split_qkv

    first = ref.blocks[0]
    shape = Shape(len(ref.blocks), first.heads, first.groups, first.hd)
    ref.embed.weight.copy_(canonical["embedding.word_embeddings.weight"])
    ref.norm.weight.copy_(canonical["head.final_norm.weight"])
    ref.head.weight.copy_(canonical["head.output_layer.weight"])
    for i, block in enumerate(ref.blocks):
        p = f"layers.{i}."
        q, k, v = split_qkv(canonical[p + "self_attention.linear_qkv.weight"], shape)
        block.q.weight.copy_(q)
        block.kv.weight.copy_(torch.cat([k, v]))
        block.proj.weight.copy_(canonical[p + "self_attention.linear_proj.weight"])
        block.fc1.weight.copy_(canonical[p + "mlp.linear_fc1.weight"])
        block.fc2.weight.copy_(canonical[p + "mlp.linear_fc2.weight"])
        block.norm1.weight.copy_(canonical[p + "input_layernorm.weight"])
        block.norm2.weight.copy_(canonical[p + "pre_mlp_layernorm.weight"])
