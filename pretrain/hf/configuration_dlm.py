"""Configuration of an exported dlm-pretrain diffusion LM (Hugging Face `transformers` format).

Self-contained: imports only `transformers`, so that `trust_remote_code=True` can load it from an
exported model directory without the dlm-pretrain package installed.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class DLMConfig(PretrainedConfig):
    """Bidirectional Llama-style transformer trained as a masked diffusion LM.

    `vocab_size` is the number of embedding rows (padded); ids >= `prediction_vocab_size` and the
    `mask_token_id` can never be predicted: their logits are -inf. `diffusion` records the
    training objective and noise schedule (dlm-pretrain's `diffusion` config section), which
    decide how the model is scored and sampled; None for exports that predate it (masked
    diffusion with the linear schedule).
    """

    model_type = "dlm"

    def __init__(
        self,
        vocab_size: int = 1024,
        prediction_vocab_size: int | None = None,
        hidden_size: int = 256,
        intermediate_size: int = 704,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        mask_token_id: int = 1,
        eos_token_id: int | None = 0,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        num_experts: int = 0,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int | None = None,
        moe_layers: list[int] | None = None,
        shared_expert_intermediate_size: int = 0,
        shared_expert_gate: bool = False,
        router_score_function: str = "softmax",
        router_pre_softmax: bool = False,
        router_expert_bias: bool = False,
        diffusion: dict | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.prediction_vocab_size = prediction_vocab_size or vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        # mixture of experts (num_experts 0: every MLP dense); `moe_layers`: 0-based indices of
        # the MoE layers. Routing: softmax over the top-k logits (pre_softmax: top-k of the
        # softmax over all experts) or sigmoid scores normalised over the top-k, the top-k
        # chosen with a per-expert bias added when `router_expert_bias`; every token is kept.
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.moe_layers = list(moe_layers or [])
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.router_score_function = router_score_function
        self.router_pre_softmax = router_pre_softmax
        self.router_expert_bias = router_expert_bias
        self.diffusion = diffusion
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
