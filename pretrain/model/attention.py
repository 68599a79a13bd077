"""Core attention: the kernel registry and the module Megatron-core's `SelfAttention` calls.

Megatron-core's own `DotProductAttention` allocates CUDA buffers and only knows causal/padding
masks; diffusion LMs attend bidirectionally and later objectives (block diffusion, AR->DLM
annealing) need arbitrary boolean masks. So the `core_attention` slot of the layer spec is ours.

Mask convention (ours, the opposite of Megatron's): the model passes None for full bidirectional
attention, or an `AttentionMask` (an objective's bool pattern, True = may attend, and/or the
documents of packed blocks; `pretrain.model.masks`), which reaches each backend in the form its
`prepare` hook makes of it, once per forward: a dense bool tensor broadcastable to
[batch, heads, s_q, s_k], a FlexAttention BlockMask, or the documents' variable-length segments.
Which patterns exist is the objectives' business (`pretrain.diffusion.masks`), not the model's.

RoPE runs here too, from cos/sin tables made once per sequence length (`RopeTable`), which reach
every layer with the mask as one `AttentionInputs` (Megatron's `SelfAttention` hands its
`attention_mask` argument to core attention untouched, and gets no rotary embedding, so it
applies none). Megatron's own unfused RoPE takes the angles and computes their cos and sin for
every element of q and k, in every layer, forward and backward: at llada-1b 8 x 2048 on an H200
that was a few ms of each step's transcendental arithmetic (bench/README.md). The rotation is
Megatron's (rotate-half, cos and sin cast to q's dtype first), so results are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from pretrain.errors import ConfigError
from pretrain.model.masks import AttentionMask, DocumentMask, flex_block_mask

# q: [b, hq, s, d]; k, v: [b, hkv, s, d] with hq a multiple of hkv (GQA) -> [b, hq, s, d]
AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: AttentionFn
    supports_mask: bool
    available: Callable[[], str | None]
    """Returns None when usable here, else the reason it is not."""
    prepare: Callable[[AttentionMask], object]
    """The `mask` this backend takes for an `AttentionMask` (default: the dense bool mask)."""


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {}


@dataclass(frozen=True)
class RopeTable:
    """cos and sin of RoPE's angles [s, 1, 1, head_dim] (Megatron's [s, b, heads, d] layout),
    in the activations' dtype (`RotaryEmbedding`)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def rows(self, position_ids: torch.Tensor) -> RopeTable:
        """The table at positions `position_ids` [s'] (a gather: no device sync)."""
        return RopeTable(self.cos[position_ids], self.sin[position_ids])


def apply_rope(t: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """t [s, b, heads, d] rotated by `rope` (rotate-half pairs j and j + d/2), in t's dtype."""
    cos, sin = rope.cos.to(t.dtype), rope.sin.to(t.dtype)
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin


@dataclass(frozen=True)
class AttentionInputs:
    """What each layer's core attention takes besides q, k, v: the mask in its backend's form
    (made once per forward by `AttentionBackend.prepare`; None: bidirectional) and RoPE's table
    (None: no rotary embedding)."""

    mask: object = None
    rope: RopeTable | None = None


def register_attention(
    name: str, *, supports_mask: bool, available=lambda: None, prepare=AttentionMask.dense
):
    def wrap(fn: AttentionFn) -> AttentionFn:
        ATTENTION_BACKENDS[name] = AttentionBackend(name, fn, supports_mask, available, prepare)
        return fn

    return wrap


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"model.attention_backend: unknown backend '{name}' "
            f"(expected one of: {', '.join(ATTENTION_BACKENDS)})"
        )
    backend = ATTENTION_BACKENDS[name]
    reason = backend.available()
    if reason is not None:
        raise ConfigError(f"model.attention_backend: '{name}' is not usable here: {reason}")
    return backend


@register_attention("sdpa", supports_mask=True)
def sdpa_attention(q, k, v, *, mask=None, scale=None, dropout_p=0.0):
    """PyTorch fused SDPA: picks flash/cuDNN/memory-efficient kernels on GPU (mask -> efficient)."""
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


@register_attention("masked", supports_mask=True)
def masked_attention(q, k, v, *, mask=None, scale=None, dropout_p=0.0):
    """Explicit softmax(QK^T * scale, masked) V in fp32: the reference for any mask."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [b, h, s_q, s_k]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v.float()).to(q.dtype)


def _flash_available() -> str | None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed (pip install 'dlm-pretrain[flash]')"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA device"
    return None


def _flash_prepare(mask: AttentionMask) -> DocumentMask | None:
    if mask.pattern is not None:
        raise ConfigError(
            "model.attention_backend 'flash' cannot take an attention pattern (flash-attn has "
            "causal and variable-length kernels, not arbitrary masks); use 'sdpa' or 'flex' for "
            "objectives that bring their own mask"
        )
    return mask.documents


@register_attention(
    "flash", supports_mask=False, available=_flash_available, prepare=_flash_prepare
)
def flash_attention(q, k, v, *, mask=None, scale=None, dropout_p=0.0):
    """flash-attn 2/3, bidirectional (fp16/bf16 on CUDA); a `DocumentMask` runs the
    variable-length kernel over the documents, without materialising any mask."""
    if isinstance(mask, DocumentMask):
        return _flash_documents(q, k, v, mask, scale=scale, dropout_p=dropout_p)
    from flash_attn import flash_attn_func

    # flash-attn wants [b, s, h, d]
    out = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=False,
    )
    return out.transpose(1, 2)


def _flash_documents(q, k, v, docs: DocumentMask, *, scale, dropout_p):
    from flash_attn import flash_attn_varlen_func

    b, hq, s, d = q.shape
    cu_seqlens, max_seqlen = docs.varlen()
    # [b, h, s, d] -> [b * s, h, d]: the documents are contiguous runs of the flattened tokens
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v))
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=False,
    )
    return out.reshape(b, s, hq, d).transpose(1, 2)


def _flex_available() -> str | None:
    if not torch.cuda.is_available():
        return "FlexAttention is compiled for CUDA here; on CPU use 'sdpa' or 'masked'"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return "this torch has no torch.nn.attention.flex_attention"
    return None


_FLEX_CACHE: dict = {}


def _flex_prepare(mask: AttentionMask):
    """A BlockMask of `mask`. A pattern alone (an objective's, the same for every batch) is
    converted once and kept while the caller keeps passing the same tensor object (held here,
    so its memory cannot be reused by another tensor while cached); document masks change with
    every batch and are converted per forward."""
    if mask.documents is not None or mask.pattern is None:
        return flex_block_mask(mask)
    cached = _FLEX_CACHE.get("pattern")
    if cached is None or cached[0] is not mask.pattern:
        _FLEX_CACHE["pattern"] = (mask.pattern, flex_block_mask(mask))
    return _FLEX_CACHE["pattern"][1]


@register_attention("flex", supports_mask=True, available=_flex_available, prepare=_flex_prepare)
def flex_attention_backend(q, k, v, *, mask=None, scale=None, dropout_p=0.0):
    """FlexAttention (GPU): block-sparse kernels that skip fully masked tiles of e.g. the
    block-diffusion mask over [x_t ; x0] or of packed documents. Takes the BlockMask `prepare`
    makes. Checked on an H100 against `masked` (equal within 1e-6), but slower than `sdpa` with
    the boolean mask at a small shape (docs/schedules.md): measure before choosing it.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if dropout_p:
        raise ConfigError("model.attention_backend 'flex' does not support attention dropout")
    if isinstance(mask, torch.Tensor):  # a dense mask passed straight to the kernel function
        mask = _flex_prepare(AttentionMask(pattern=mask))
    if "kernel" not in _FLEX_CACHE:  # eager flex_attention is a slow reference: compile it once
        _FLEX_CACHE["kernel"] = torch.compile(flex_attention)
    return _FLEX_CACHE["kernel"](
        q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


class CoreAttention(MegatronModule):
    """The `core_attention` submodule of Megatron-core's `SelfAttention`, backed by the registry.

    Megatron passes q/k/v as [s, b, heads, head_dim] (heads already split across TP ranks) and
    expects [s, b, heads * head_dim] back.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        backend: str = "sdpa",
    ):
        super().__init__(config=config)
        self.backend = get_attention_backend(backend)
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences / attention bias are not supported")
        rope = None
        if isinstance(attention_mask, AttentionInputs):
            attention_mask, rope = attention_mask.mask, attention_mask.rope
        if rope is not None:
            query, key = apply_rope(query, rope), apply_rope(key, rope)
        if isinstance(attention_mask, AttentionMask | DocumentMask):  # not prepared upstream
            attention_mask = self.backend.prepare(AttentionMask.of(attention_mask))
        elif isinstance(attention_mask, torch.Tensor) and not self.backend.supports_mask:
            raise ConfigError(
                f"model.attention_backend '{self.backend.name}' cannot take an attention mask; "
                "use 'sdpa' or 'masked' for objectives that need one"
            )
        s, b, h, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = self.backend.fn(
            q,
            k,
            v,
            mask=attention_mask,
            scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
