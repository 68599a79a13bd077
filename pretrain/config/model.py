"""Configuration of the model: the transformer's shape and kernels, and its mixture of experts.

Sections of the run's configuration (`pretrain.config.schema.Config`); the string literal under
a field is its documentation, as everywhere in the schema.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pretrain.errors import ConfigError


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """The embedding/output vocabulary: `vocab_size` rounded up to `multiple`; independent of
    the TP size so every layout has identical weights."""
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture-of-experts MLPs (Megatron-core's router and experts; docs/moe.md)."""

    num_experts: int = 0
    """Routed experts per MoE layer; 0 keeps every MLP dense."""
    top_k: int = 2
    """Experts each token is routed to."""
    expert_ffn_hidden_size: int | None = None
    """Inner width of each routed expert's SwiGLU MLP; null uses model.ffn_hidden_size."""
    shared_expert_ffn_hidden_size: int = 0
    """Inner width of the shared-expert MLP that every token passes through besides its routed
    experts (n shared experts of width f: n * f); 0 for none."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by a learned per-token sigmoid gate."""
    layer_frequency: int = 1
    """Every n-th layer (after `first_dense_layers`) is an MoE layer, the others stay dense:
    1 = every layer, 2 = every other layer."""
    first_dense_layers: int = 0
    """The first k layers keep a dense MLP (DeepSeek's first_k_dense_replace)."""
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: `softmax` over the experts, or per-expert `sigmoid` (needed by the
    expert bias of `expert_bias_update_rate`)."""
    pre_softmax: bool = False
    """softmax: take the top-k of the softmax over all experts (weights not renormalised) instead
    of the softmax over the top-k logits (weights summing to 1)."""
    aux_loss_coeff: float = 1e-2
    """Switch-Transformer load-balancing loss coeff * E/k * sum_e f_e P_e per MoE layer, added to
    the training loss; f (routed share) and P (mean router probability) are taken over the whole
    data-parallel micro-batch, so the loss does not depend on the layout. 0 disables it."""
    z_loss_coeff: float = 0.0
    """Router z-loss coeff * mean(logsumexp(router logits)^2) per MoE layer (ST-MoE); 0 = off."""
    expert_bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the scores only
    to choose the top-k, moves by this rate towards balance after every optimizer step (sign of
    mean load minus the expert's load over the step's global batch). 0 = off; needs
    score_function sigmoid."""
    capacity_factor: float | None = None
    """Token dropping: each expert takes at most capacity_factor * tokens * k / E assignments of
    a rank's micro-batch, the rest are dropped (the residual carries those tokens). null =
    dropless (default). Capacity is per rank, so dropping depends on the data-parallel size."""
    drop_policy: Literal["probs", "position"] = "probs"
    """With capacity_factor: drop the lowest-probability assignments or the latest positions."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (0-based) has routed experts."""
        if not self.enabled or index < self.first_dense_layers:
            return False
        return (index - self.first_dense_layers) % self.layer_frequency == 0

    def validate(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts must be >= 0, got {self.num_experts}")
        # Ranges hold whether or not MoE is on: a bad value is an error even in a dense config.
        for key in ("shared_expert_ffn_hidden_size", "aux_loss_coeff", "z_loss_coeff"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.{key} must be >= 0, got {getattr(self, key)}")
        if self.expert_bias_update_rate < 0:
            raise ConfigError(
                f"model.moe.expert_bias_update_rate must be >= 0, got "
                f"{self.expert_bias_update_rate}"
            )
        if not self.enabled:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"model.moe.top_k ({self.top_k}) must be in [1, model.moe.num_experts "
                f"({self.num_experts})]"
            )
        if self.layer_frequency < 1 or self.first_dense_layers < 0:
            raise ConfigError(
                "model.moe.layer_frequency must be >= 1 and model.moe.first_dense_layers >= 0"
            )
        for key in ("expert_ffn_hidden_size",):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"model.moe.{key} must be positive, got {value}")
        if self.expert_bias_update_rate and self.score_function != "sigmoid":
            raise ConfigError(
                "model.moe.expert_bias_update_rate needs model.moe.score_function 'sigmoid' "
                "(the bias shifts sigmoid scores; a softmax over biased logits changes weights)"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"model.moe.capacity_factor must be > 0 or null, got {self.capacity_factor}"
            )


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int | None = None
    """Tokenizer vocabulary incl. special tokens; null takes it from the data manifest."""
    hidden_size: int = 256
    """Width of the residual stream (d_model)."""
    num_layers: int = 4
    """Number of transformer layers."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention); null means one per query head (MHA)."""
    ffn_hidden_size: int = 704
    """Inner width of the SwiGLU MLP (each of the gate and up projections)."""
    rope_base: float = 10000.0
    """RoPE base frequency (theta)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal weight init; output projections are scaled by 1/sqrt(2*num_layers)."""
    attention_backend: str = "sdpa"
    """Core attention kernel: `sdpa` (PyTorch fused, default), `flash` (flash-attn), `masked`."""
    make_vocab_size_divisible_by: int = 128
    """The embedding/output vocab is padded to a multiple of this (must be divisible by TP)."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer in the backward pass to save activation memory."""
    compile: bool = False
    """torch.compile each transformer layer (GPU; the first steps pay the compilation)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode of `compile`: `reduce-overhead` replays each layer as CUDA graphs (less
    host launch time), `max-autotune-no-cudagraphs` autotunes the fused kernels (slower start)."""
    compile_scope: Literal["layer", "trunk"] = "layer"
    """What one compiled graph covers: `layer` (one graph shared by all layers: fast to compile)
    or `trunk` (all layers in one graph, entered once per forward and once per backward: fewer
    host gaps, longer compilation; pipeline parallelism always compiles per layer)."""
    compile_head: bool = True
    """With `compile`, on one TP rank: each chunk of the sparse output layer (final RMSNorm, the
    output projection with its FP8 casts under `fp8_output_layer`, the cross-entropy) runs as
    one compiled graph, so the casts and the norm fuse into the kernels around the GEMM
    (measured on one H200 with `fp8`: +1.5% tokens/s in two runs; neutral in bf16). Off:
    the projection runs eagerly and only the cross-entropy is compiled. Under TP the
    vocab-parallel cross-entropy's collectives keep the chunk eager either way."""
    sparse_output: bool = True
    """Run the output layer and cross-entropy only where the loss needs them (masked tokens),
    in memory-bounded chunks (any layout; under sequence parallelism the head runs on every
    position, as its output layer gathers the sequence)."""
    sparse_output_recompute: bool = False
    """With `sparse_output`: recompute each chunk's output layer and softmax in the backward
    pass (true: nothing of the logits is kept), or keep each chunk's logit gradient (softmax -
    one-hot) from the forward instead (false, the default: one output-layer GEMM and a pass
    over the logits fewer per step, for n x V/tp elements in the parameters' dtype, ~2 GB at
    8 x 2048 tokens half masked with LLaDA's 126k vocabulary in bf16; measured on one H200:
    +2.2 to 2.5% tokens/s in bf16, +1.8% with `fp8`). True when those bytes are short."""
    sdpa_backends: list[Literal["cudnn", "flash", "efficient", "math"]] = field(
        default_factory=lambda: ["cudnn", "flash", "efficient", "math"]
    )
    """Priority order of PyTorch's fused attention kernels for the `sdpa` backend on GPU
    (`cudnn`, `flash`, `efficient`, `math`); the first one that supports the inputs runs."""
    fp8: Literal["tensorwise", "rowwise"] | Literal[False] = False
    """FP8 matmuls (torchao float8 training, dynamic scaling) in the transformer layers' linears
    (the output layer too with `fp8_output_layer`): `off` (YAML false,
    the default), `tensorwise` (one scale per tensor) or `rowwise` (per row/column). Weights and
    master weights keep their precision, so checkpoints are the same. Needs torchao
    (`pip install '.[fp8]'`) and a GPU with FP8 tensor cores (CUDA capability >= 8.9);
    docs/performance.md."""
    fp8_output_layer: bool = False
    """With `model.fp8`: the output layer's GEMMs in FP8 too. Off by default: on the sparse
    head (chunks of masked rows, recomputed in backward) its casts cost what its FP8 GEMMs
    save (bench/README.md); the layers' linears are FP8 either way."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts MLPs (`model.moe.num_experts: 0` = dense)."""

    def validate(self) -> None:
        self.moe.validate()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({groups})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("model.hidden_size / model.num_attention_heads must be even for RoPE")
        for key in (
            "hidden_size",
            "num_layers",
            "ffn_hidden_size",
            "make_vocab_size_divisible_by",
            "rope_base",
            "norm_eps",
            "init_std",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
