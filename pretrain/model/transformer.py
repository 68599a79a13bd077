"""The diffusion LM: a bidirectional Llama-style transformer assembled from Megatron-core layers.

    tokens [b, s] -> TokenEmbedding -> hidden [s, b, h] -> N x TransformerLayer -> OutputHead
                  -> logits [s, b, V_pad / tp]   (or per-token cross-entropy [b, s])

Written for one device: tensor parallelism lives inside the Megatron-core layers (column/row-
parallel linears, vocab-parallel embedding and cross-entropy) and is switched on by the process
groups, not by this code; the model is given its tensor-parallel rank and group, it looks up no
global state. The model is three kinds of stage (embedding, layers, head) so that a pipeline
engine can cut it into a layer list without another implementation (`pretrain.parallel.pipeline`).

The model does not know what trains it: `forward(..., loss_fn=f)` returns `f(hidden, head)`, the
caller's loss on the last hidden states [s, b, h] with the head's operations at hand (`token_ce`
at chosen positions, `full_logits`, `energy`). That is how an objective's loss runs inside
DeepSpeed's forward, and what the last pipeline stage calls.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig, MoEConfig
from pretrain.config.schema import padded_vocab_size
from pretrain.model.attention import AttentionInputs, RopeTable, get_attention_backend
from pretrain.model.head_loss import StoredGradientCE, ce_and_logit_grad, scale_rows
from pretrain.model.layers import RMSNorm, RotaryEmbedding, build_layer
from pretrain.model.masks import AttentionMask, DocumentMask
from pretrain.model.moe import MoEBlock, routing_replay

COMPILED = "dlm_compiled"
"""Attribute `compile_model` sets on the layers it compiles one by one."""
CE_CHUNK_BYTES = 1 << 30
"""Largest fp32 logits chunk the sparse output head materialises at once."""

__all__ = ["DLMTransformer", "OutputHead", "TokenEmbedding", "padded_vocab_size", "run_layer"]


def megatron_config(
    model: ModelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    sequence_parallel: bool = False,
    expert_parallel_size: int = 1,
) -> TransformerConfig:
    """Our ModelConfig -> Megatron-core TransformerConfig (RMSNorm, SwiGLU, no bias, no dropout;
    `model.moe` as Megatron's MoE fields, which our MoE layers read).

    Megatron's own initialisation is switched off (`perform_initialization=False`): weights are
    set by `pretrain.model.sharding.initialize`, which gives the same model in every layout.
    """
    return TransformerConfig(
        **moe_fields(model.moe, model.ffn_hidden_size, expert_parallel_size),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype if pipeline_parallel_size > 1 else None,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        sequence_parallel=sequence_parallel,
        # The fusions need apex/TE kernels; the plain paths run everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def moe_fields(moe: MoEConfig, ffn_hidden_size: int, expert_parallel_size: int) -> dict:
    """`model.moe` in Megatron-core's TransformerConfig names (nothing for a dense model)."""
    if not moe.enabled:
        return {}
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size or ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_router_score_function=moe.score_function,
        moe_router_pre_softmax=moe.pre_softmax,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_enable_expert_bias=moe.expert_bias_update_rate > 0,
        moe_router_bias_update_rate=moe.expert_bias_update_rate,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.drop_policy,
        expert_model_parallel_size=expert_parallel_size,
    )


class TokenEmbedding(torch.nn.Module):
    """Vocab-parallel embedding: tokens [b, s] -> hidden [s, b, h] (Megatron's sequence-first).

    With sequence parallelism each TP rank keeps its slice of the sequence: [s / tp, b, h].
    """

    def __init__(self, config: TransformerConfig, padded_vocab: int):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            padded_vocab, config.hidden_size, init_method=config.init_method, config=config
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings(tokens).transpose(0, 1).contiguous()
        if self.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        return hidden


def dense_cross_entropy(
    logits: torch.Tensor, excluded: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """logits [n, V] holding the whole vocab, excluded [V] bool, targets [n] -> CE [n] in fp32.

    One fused log-softmax over fp32 logits, where Megatron's vocab-parallel CE (needed when the
    vocab is split over TP ranks) makes several passes."""
    logits = logits.float().masked_fill(excluded, float("-inf"))
    return F.cross_entropy(logits, targets, reduction="none")


class OutputHead(torch.nn.Module):
    """Final RMSNorm + vocab-parallel output projection.

    Tokens that may never be predicted (the mask token, vocab padding) get logit -inf, so the
    model's distribution is over the real vocabulary minus the mask: a uniform predictor has
    cross-entropy log(vocab_size - 1) exactly.
    """

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        padded_vocab: int,
        excluded_token_ids: tuple[int, ...],
        *,
        tp_rank: int = 0,
        tp_group=None,
        recompute: bool = True,
    ):
        """`recompute`: `model.sparse_output_recompute` (see `sparse_cross_entropy`)."""
        super().__init__()
        self.final_norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            padded_vocab,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )
        # This rank's slice of the vocab: [start, start + padded_vocab / tp)
        tp_size = config.tensor_model_parallel_size
        if tp_size > 1 and tp_group is None:
            raise ValueError("OutputHead: under tensor parallelism pass tp_rank and tp_group")
        start = tp_rank * (padded_vocab // tp_size)
        self.tp_size, self.tp_rank, self.tp_group = tp_size, tp_rank, tp_group
        self.vocab_start, self.recompute = start, recompute
        self.vocab_size = vocab_size
        self.sequence_parallel = config.sequence_parallel
        self.dense_ce = dense_cross_entropy
        self.chunk_ce = self._rows_ce  # one chunk of `sparse_cross_entropy` (`compile_loss`)
        self.stored_fns = (ce_and_logit_grad, scale_rows)  # StoredGradientCE's (compiled)
        self.stored_chunk_ce = self._stored_rows_ce  # a chunk without `recompute`
        ids = torch.arange(start, start + padded_vocab // tp_size)
        excluded = ids >= vocab_size
        for token in excluded_token_ids:
            excluded |= ids == token
        self.register_buffer("excluded", excluded, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] -> logits [s, b, V_pad / tp] with excluded ids at -inf (the head's
        own computation; a pipeline stage's `forward` is something else)."""
        logits, _ = self.output_layer(self.final_norm(hidden))
        return logits.masked_fill(self.excluded, float("-inf"))

    def token_ce(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        positions: torch.Tensor | None = None,
        count: int | None = None,
    ) -> torch.Tensor:
        """hidden [s (/ tp under sequence parallelism), b, h], targets [b, s] -> per-token
        -log p(target) [b, s] fp32. With `positions` (bool [b, s]) the output layer runs only
        there (0 elsewhere; `sparse_cross_entropy`), except under sequence parallelism, where the
        output layer gathers the sequence itself and runs on every position."""
        if positions is not None and not self.sequence_parallel:
            return self.sparse_cross_entropy(hidden, targets, positions, count)
        return OutputHead.cross_entropy(self.logits(hidden), targets)

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [s (/ tp), b, h] -> fp32 logits [b, s, V] over the real vocabulary on every TP
        rank (gathered; the mask token at -inf). Differentiable."""
        local = self.logits(hidden).transpose(0, 1)  # [b, s, V_pad / tp]
        return gather_vocab_parallel(local, self.tp_group)[..., : self.vocab_size].float()

    def energy(self, hidden: torch.Tensor, *, row: int) -> torch.Tensor:
        """hidden [s (/ tp), b, h] -> scalar sequence energy [b] fp32 (`pretrain.model.energy`)."""
        from pretrain.model.energy import energy_from_hidden

        return energy_from_hidden(self, hidden, row=row)

    @staticmethod
    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits [s, b, V/tp], targets [b, s] -> per-token -log p(target) [b, s] in fp32."""
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets.t().contiguous())
        return ce.t()

    def sparse_cross_entropy(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        positions: torch.Tensor,
        count: int | None = None,
    ) -> torch.Tensor:
        """hidden [s, b, h], targets [b, s], positions bool [b, s] -> CE [b, s], 0 off `positions`.

        The masked-diffusion loss reads the CE only where a token is masked, so the output layer
        and the softmax run on those n rows alone, in chunks whose fp32 logits stay under
        `CE_CHUNK_BYTES`. Each chunk is recomputed in the backward pass instead of keeping its
        logits: the full [s, b, V] fp32 logits (8 GB for 8 x 2048 tokens at LLaDA's 126k vocab)
        never exist. Needs the whole sequence on this rank (no sequence parallelism).
        `count` (= positions.sum(), when the caller knows it on the host) sizes the rows without
        the device-to-host sync a data-dependent `nonzero` costs. Without `recompute` each
        chunk keeps its logit gradient instead (`head_loss.py`): no GEMM in the recomputation.
        """
        s, b, h = hidden.shape
        flat = positions.t().reshape(-1)  # [s*b], the layout of `hidden`
        if count is not None and not flat.is_cuda and count != int(flat.sum()):
            # a wrong count would silently drop or invent rows; checked where it costs nothing
            raise ValueError(f"loss_count {count} != {int(flat.sum())} loss positions")
        found = flat.nonzero() if count is None else torch.nonzero_static(flat, size=count)
        rows = found.squeeze(1)  # [n] indices into s*b
        selected = hidden.reshape(s * b, h).index_select(0, rows)  # [n, h]
        wanted = targets.t().reshape(-1).index_select(0, rows)  # [n]
        vocab_local = self.excluded.numel()
        chunk = max(1, CE_CHUNK_BYTES // (4 * vocab_local))
        if not torch.is_grad_enabled():
            run = self.chunk_ce
        elif self.recompute:
            run = functools.partial(checkpoint, self.chunk_ce, use_reentrant=False)
        else:
            run = self.stored_chunk_ce
        pieces = [
            run(selected[i : i + chunk], wanted[i : i + chunk])
            for i in range(0, rows.numel(), chunk)
        ]
        ce = torch.zeros(s * b, dtype=torch.float32, device=hidden.device)
        if pieces:
            ce = ce.index_put((rows,), torch.cat(pieces))
        return ce.view(s, b).t()

    def _rows_ce(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden [n, h], targets [n] -> CE [n] fp32 (vocab-parallel over TP)."""
        logits, _ = self.output_layer(self.final_norm(hidden))  # [n, V/tp]
        if self.tp_size == 1:
            return self.dense_ce(logits, self.excluded, targets)
        logits = logits.masked_fill(self.excluded, float("-inf")).float()
        return tensor_parallel.vocab_parallel_cross_entropy(logits, targets)

    def _stored_rows_ce(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden [n, h], targets [n] -> CE [n] fp32, autograd keeping G, not the logits."""
        logits, _ = self.output_layer(self.final_norm(hidden))  # [n, V/tp]
        group = self.tp_group if self.tp_size > 1 else None
        return StoredGradientCE.apply(
            logits, self.excluded, targets, self.vocab_start, group, self.stored_fns
        )

    def compile_loss(self, *, whole_chunk: bool = False) -> None:
        """Fuse cast, exclusion and log-softmax of the (single-rank) CE into generated kernels;
        with `whole_chunk` (`model.compile_head`, one TP rank) the final norm and the output
        projection join them: one graph per chunk, dynamic in its row count (recomputed or
        keeping its logit gradient)."""
        self.dense_ce = torch.compile(dense_cross_entropy, dynamic=True)
        self.stored_fns = tuple(torch.compile(f, dynamic=True) for f in self.stored_fns)
        if whole_chunk and self.tp_size == 1:
            self.chunk_ce = torch.compile(self._rows_ce, dynamic=True)
            self.stored_chunk_ce = torch.compile(self._stored_rows_ce, dynamic=True)


class _GatherVocab(torch.autograd.Function):
    """All-gather vocab-parallel logits along the last dim; backward keeps this rank's slice.

    Megatron's own gather allocates its buffer on a CUDA device; this one runs on CPU (gloo) too.
    No gradient reduction is needed: every TP rank computes the same loss from the same gathered
    logits, so each one's gradient for its own slice is already the full gradient.
    """

    @staticmethod
    def forward(ctx, local, group):
        tp = torch.distributed.get_world_size(group) if group is not None else 1
        ctx.rank, ctx.width = (torch.distributed.get_rank(group) if tp > 1 else 0), local.shape[-1]
        if tp == 1:
            return local
        pieces = [torch.empty_like(local) for _ in range(tp)]
        torch.distributed.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(-1, ctx.rank * ctx.width, ctx.width), None


def gather_vocab_parallel(local: torch.Tensor, group=None) -> torch.Tensor:
    """Logits [..., V/tp] sliced by vocabulary over the TP ranks of `group` -> [..., V] on every
    rank (differentiable; the identity without tensor parallelism)."""
    return _GatherVocab.apply(local, group)


class DLMTransformer(torch.nn.Module):
    """Bidirectional transformer for masked/hybrid diffusion LMs (LLaDA-style architecture)."""

    def __init__(
        self,
        model: ModelConfig,
        config: TransformerConfig,
        *,
        vocab_size: int,
        excluded_token_ids: tuple[int, ...],
        tp_rank: int = 0,
        tp_group=None,
        moe_groups=None,
    ):
        """`moe_groups`: Megatron's process groups for the MoE layers (`expert_groups()`)."""
        super().__init__()
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by)
        self.activation_checkpointing = model.activation_checkpointing
        self.config = config
        self.embedding = TokenEmbedding(config, self.padded_vocab)
        self.rotary = RotaryEmbedding(config.kv_channels, model.rope_base)
        # how the layers' attention backend takes a mask (prepared once per forward)
        self.prepare_mask = get_attention_backend(model.attention_backend).prepare
        self.layers = torch.nn.ModuleList(
            build_layer(model, config, i + 1, moe_groups) for i in range(config.num_layers)
        )
        self.head = OutputHead(
            config,
            vocab_size,
            self.padded_vocab,
            excluded_token_ids,
            tp_rank=tp_rank,
            tp_group=tp_group,
            recompute=model.sparse_output_recompute,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        loss_positions: torch.Tensor | None = None,
        loss_count: int | None = None,
        position_ids: torch.Tensor | None = None,
        loss_fn=None,
    ):
        """tokens [b, s] -> `loss_fn(hidden, head)` if given, else per-token CE [b, s] if
        `targets` is given, else logits [b, s, V/tp].

        `attention_mask`: None (bidirectional), an `AttentionMask` (an objective's pattern and/or
        documents), a bool pattern broadcastable to [b, heads, s, s] (True where attention is
        allowed), or a `DocumentMask` (attention within documents).
        `loss_positions` (bool [b, s], with `targets`): compute the CE only there (0 elsewhere),
        skipping the output layer at every other position;
        `loss_count` (their number, if known on the host) spares a device sync.
        `position_ids` ([s] long in [0, s), shared by the batch; None = 0..s-1): RoPE positions,
        e.g. the two copies 0..L-1 of block diffusion's [x_t ; x0].
        """
        hidden = self.hidden_states(  # [s, b, h]
            tokens, attention_mask=attention_mask, position_ids=position_ids
        )
        if loss_fn is not None:
            return loss_fn(hidden, self.head)
        if targets is not None and loss_positions is not None:
            return self.head.sparse_cross_entropy(hidden, targets, loss_positions, loss_count)
        logits = self.head(hidden)  # [s, b, V/tp]
        if targets is not None:
            return OutputHead.cross_entropy(logits, targets)
        return logits.transpose(0, 1)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [b, s] -> the last layer's hidden states [s, b, h] (before the final norm)."""
        hidden = self.embedding(tokens)  # [s, b, h]
        rope = rope_table(self.rotary, tokens.shape[1], position_ids, hidden.dtype)
        return self.trunk(hidden, prepare_mask(self.prepare_mask, attention_mask), rope)

    def trunk(self, hidden, attention_mask, rope) -> torch.Tensor:
        """All transformer layers on hidden [s, b, h] (one function: `model.compile_scope`
        'trunk' compiles it as one graph)."""
        for layer in self.layers:
            hidden = self._run_layer(layer, hidden, attention_mask, rope)
        return hidden

    def _run_layer(self, layer, hidden, attention_mask, rope):
        return run_layer(
            layer, hidden, attention_mask, rope, self.activation_checkpointing and self.training
        )


def run_layer(layer, hidden, attention_mask, rope: RopeTable, recompute: bool) -> torch.Tensor:
    """One Megatron TransformerLayer on hidden [s, b, h]; `recompute` re-runs it in backward
    (an MoE layer with its forward's routing: `moe.keep_routing`). The mask and RoPE's table
    reach our core attention together (`AttentionInputs`); Megatron applies no RoPE itself."""
    inputs = AttentionInputs(mask=attention_mask, rope=rope)
    if recompute:
        # Not for compiled layers: selective checkpointing around a compiled MoE layer gave the
        # experts wrong gradients (up to 10% off on CPU, torch 2.13; tests/test_moe.py).
        compiled = torch.compiler.is_compiling() or getattr(layer, COMPILED, False)
        moe = isinstance(layer.mlp, MoEBlock) and not compiled
        replay = {"context_fn": routing_replay} if moe else {}
        return checkpoint(
            lambda h: layer(h, attention_mask=inputs, rotary_pos_emb=None)[0],
            hidden,
            use_reentrant=False,
            **replay,
        )
    return layer(hidden, attention_mask=inputs, rotary_pos_emb=None)[0]


def rope_table(rotary: RotaryEmbedding, seq_len: int, position_ids, dtype) -> RopeTable:
    """RoPE's cos/sin [s, 1, 1, d] in `dtype` for positions 0..s-1, or for `position_ids` [s]
    (a gather, not a max(): no device sync for the table size)."""
    rope = rotary(seq_len, dtype)
    return rope if position_ids is None else rope.rows(position_ids)


def prepare_mask(prepare, attention_mask):
    """An attention mask in the form the layers' backend takes (`AttentionBackend.prepare`),
    made once per forward; a plain bool tensor passes through."""
    if isinstance(attention_mask, AttentionMask | DocumentMask):
        return prepare(AttentionMask.of(attention_mask))
    return attention_mask
