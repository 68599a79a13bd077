"""Modeling code of an exported dlm-pretrain diffusion LM, for Hugging Face `transformers`.

Self-contained (only torch + transformers), shipped next to the weights and loaded with
`AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)`. Plain PyTorch:

    tokens [b, s] -> embed -> N x (x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))) -> RMSNorm -> head

(in the layers `config.moe_layers` the SwiGLU is a mixture of experts, `DLMSparseMoE`).
Attention is bidirectional (a boolean mask may restrict it), through PyTorch's fused
`scaled_dot_product_attention` (flash / cuDNN / memory-efficient kernels on GPU) or an explicit
"eager" softmax. RoPE uses the non-interleaved ("rotate half") layout. Norms run in fp32, so bf16
weights give fp32-normalised activations. `diffusion_generate` samples by iterative unmasking.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .configuration_dlm import DLMConfig


class DLMRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_angles(
    config: DLMConfig, seq_len: int, device, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [s, head_dim] of angle_{p,j} = p * theta^(-2j/d), both halves alike, for the
    positions p = 0..s-1 or `position_ids` ([s], e.g. block diffusion's two copies 0..L-1 of
    [x_t ; x0]; or [b, s], giving [b, 1, s, head_dim]).

    Computed per call rather than kept in a buffer: it is cheap, and nothing has to survive
    meta-device initialisation or dtype casts (angles are always fp32).
    """
    d = config.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.float64, device=device) / d
    inv_freq = (1.0 / config.rope_theta**exponents).float()
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=device)
    freqs = position_ids.to(device, torch.float32)[..., None] * inv_freq  # [(b,) s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    if emb.dim() == 3:
        emb = emb[:, None]  # [b, 1, s, d]: broadcasts over heads
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, d] rotated in fp32: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class DLMAttention(nn.Module):
    def __init__(self, config: DLMConfig):
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.config.head_dim
        q = self.q_proj(x).view(b, s, self.num_heads, d).transpose(1, 2)  # [b, hq, s, d]
        k = self.k_proj(x).view(b, s, self.num_kv, d).transpose(1, 2)  # [b, hkv, s, d]
        v = self.v_proj(x).view(b, s, self.num_kv, d).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.config._attn_implementation == "eager":
            out = eager_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * d))


def eager_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d), masked) v with fp32 scores; k, v repeated for grouped queries."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


class DLMMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DLMConfig, intermediate_size: int | None = None):
        super().__init__()
        h, f = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DLMSparseMoE(nn.Module):
    """Mixture of experts: each token's top-k routed SwiGLU experts, weighted by the router's
    probabilities, plus the shared experts every token passes through.

        logits [N, E] = gate(x) in fp32
        softmax:  top-k of the logits, probabilities = softmax over those k (pre_softmax: the
                  top-k of softmax(logits), not renormalised)
        sigmoid:  scores = sigmoid(logits); top-k of scores (+ expert_bias, for the choice
                  only); probabilities = the k scores / their sum (k > 1)
    """

    def __init__(self, config: DLMConfig):
        super().__init__()
        self.config = config
        h, e = config.hidden_size, config.num_experts
        self.gate = nn.Linear(h, e, bias=False)
        if config.router_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(e, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.experts = nn.ModuleList(DLMMLP(config, config.moe_intermediate_size) for _ in range(e))
        self.shared_experts = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_experts = DLMMLP(config, config.shared_expert_intermediate_size)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, h] -> (probabilities [N, k] fp32, expert indices [N, k])."""
        cfg, k = self.config, self.config.num_experts_per_tok
        logits = F.linear(x.float(), self.gate.weight.float())
        if cfg.router_score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
            index = choice.topk(k, dim=-1).indices
            probs = scores.gather(-1, index)
            return (probs / (probs.sum(-1, keepdim=True) + 1e-20) if k > 1 else probs), index
        if cfg.router_pre_softmax:
            return torch.softmax(logits, dim=-1).topk(k, dim=-1)
        top, index = logits.topk(k, dim=-1)
        return torch.softmax(top, dim=-1), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        probs, index = self.route(flat)  # [N, k] each
        out = torch.zeros_like(flat, dtype=torch.float32)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(index == e)  # tokens routed to e, and in which of k
            if rows.numel():
                weighted = expert(flat[rows]).float() * probs[rows, slot, None]
                out.index_add_(0, rows, weighted)
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(flat))
            out = out + shared
        return out.view(b, s, h)


class DLMDecoderLayer(nn.Module):
    def __init__(self, config: DLMConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = DLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DLMAttention(config)
        self.post_attention_layernorm = DLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.num_experts and layer_idx in config.moe_layers
        self.mlp = DLMSparseMoE(config) if moe else DLMMLP(config)

    def forward(self, x: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), (cos, sin), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DLMPreTrainedModel(PreTrainedModel):
    config_class = DLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DLMDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, DLMRMSNorm):
            nn.init.ones_(module.weight)


def attention_mask_4d(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None (full attention), [b, s] padding mask (1 = real token), or bool [b, 1|h, s, s] kept.

    Returns a bool mask broadcastable to [b, h, s_q, s_k], True where attention is allowed.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if bool(attention_mask.all()):
            return None
        return attention_mask.bool()[:, None, None, :]
    return attention_mask.bool()


class DLMModel(DLMPreTrainedModel):
    """The transformer body: tokens [b, s] -> final normed hidden states [b, s, h]."""

    def __init__(self, config: DLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = DLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        x = self.embed_tokens(input_ids)  # [b, s, h]
        cos, sin = rotary_angles(self.config, input_ids.shape[1], input_ids.device, position_ids)
        mask = attention_mask_4d(attention_mask)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class DLMForMaskedLM(DLMPreTrainedModel):
    """Body + output head. Logits of ids that may never be predicted (the mask token, vocab
    padding) are -inf, exactly as in training, so softmax gives the model's distribution."""

    def __init__(self, config: DLMConfig):
        super().__init__(config)
        self.model = DLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def excluded_ids(self, device) -> torch.Tensor:
        """bool [V]: ids whose logit is -inf."""
        ids = torch.arange(self.config.vocab_size, device=device)
        return (ids >= self.config.prediction_vocab_size) | (ids == self.config.mask_token_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """input_ids [b, s] -> logits [b, s, V]; `labels` [b, s] (-100 = ignored) give the mean
        cross-entropy over the labelled positions; `position_ids` ([s] or [b, s]) the RoPE
        positions (default 0..s-1)."""
        hidden = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        logits = self.lm_head(hidden).masked_fill(self.excluded_ids(hidden.device), float("-inf"))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100
            )
        return MaskedLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: torch.Tensor,
        *,
        max_new_tokens: int = 64,
        steps: int | None = None,
        block_length: int | None = None,
        temperature: float = 0.0,
        remasking: str = "low_confidence",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Masked-diffusion sampling: append `max_new_tokens` masks and unmask them in `steps`
        forward passes, block by block from left to right (one block: fully parallel order).

        Each step predicts every masked position of the current block (argmax, or a sample at
        `temperature` > 0) and commits the k most confident ones (`low_confidence` remasking: the
        rest stay masked) or k random ones (`random`), k spreading the block evenly over its steps.
        Returns the prompt followed by the generated tokens, [b, prompt + max_new_tokens].
        """
        if remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
        mask_id = self.config.mask_token_id
        block_length = block_length or max_new_tokens
        if max_new_tokens % block_length:
            raise ValueError(
                f"max_new_tokens ({max_new_tokens}) must be a multiple of block_length"
            )
        num_blocks = max_new_tokens // block_length
        steps = steps or max_new_tokens
        if steps % num_blocks:
            raise ValueError(f"steps ({steps}) must be a multiple of the block count {num_blocks}")
        per_block = steps // num_blocks
        b, prompt = input_ids.shape
        x = F.pad(input_ids, (0, max_new_tokens), value=mask_id)
        for block in range(num_blocks):
            lo = prompt + block * block_length
            hi = lo + block_length
            counts = [
                block_length // per_block + (i < block_length % per_block) for i in range(per_block)
            ]
            for k in counts:
                masked = x == mask_id
                masked[:, hi:] = False  # later blocks wait for theirs
                logits = self(x).logits.float()  # [b, s, V]
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    flat = torch.multinomial(probs.flatten(0, 1), 1, generator=generator)
                    guess = flat.view(b, -1)
                else:
                    guess = logits.argmax(-1)
                if remasking == "low_confidence":
                    score = torch.softmax(logits, dim=-1).gather(-1, guess[..., None])[..., 0]
                else:
                    score = torch.rand(x.shape, generator=generator, device=x.device)
                score = score.masked_fill(~masked, float("-inf"))
                take = score.topk(k, dim=-1).indices  # [b, k]
                commit = torch.zeros_like(masked).scatter_(1, take, True) & masked
                x = torch.where(commit, guess, x)
        return x
