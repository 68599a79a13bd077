"""The two network implementations an evaluation runs on, behind one small interface.

    hidden(tokens [b, s], attention_mask, position_ids) -> final hidden states [b, s, h]
    project(hidden [m, h]) -> logits [m, V] fp32, ids that are never predicted at -inf
    module: what `pretrain.sampling` calls, module(x, attention_mask=...) -> logits [b, s, V]

Scoring projects only the positions it scores (a few per row), never the full [b, s, V] logits:
at LLaDA's 126k vocabulary those would not fit next to a batch. `attention_mask` is None or bool,
broadcastable to [b, heads, s, s], True = may attend; `position_ids` is None (0..s-1) or [s].
"""

from __future__ import annotations

import torch

from pretrain.model.transformer import gather_vocab_parallel


class MegatronNet:
    """Our training model (`DLMTransformer`), from a checkpoint or the trainer's replica. With
    tensor parallelism every TP rank runs the same rows and the vocabulary slices are gathered."""

    def __init__(self, module, *, tensor_parallel: bool = False):
        self.module = module
        self.tensor_parallel = tensor_parallel

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.module.padded_vocab

    def hidden(self, tokens, attention_mask=None, position_ids=None) -> torch.Tensor:
        out = self.module.hidden_states(  # [s, b, h], before the final norm (the head applies it)
            tokens, attention_mask=attention_mask, position_ids=position_ids
        )
        return out.transpose(0, 1)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module.head(hidden[:, None])[:, 0]  # head: [s, b, h] -> [s, b, V/tp]
        if self.tensor_parallel:
            logits = gather_vocab_parallel(logits)
        return logits.float()


class HFNet:
    """An exported directory's `DLMForMaskedLM` (plain PyTorch, SDPA)."""

    def __init__(self, model):
        self.model = model
        self.module = _LogitsOnly(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def hidden(self, tokens, attention_mask=None, position_ids=None) -> torch.Tensor:
        out = self.model.model(tokens, attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state  # already through the final norm

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden).float()
        return logits.masked_fill(self.model.excluded_ids(hidden.device), float("-inf"))


class _LogitsOnly(torch.nn.Module):
    """`DLMForMaskedLM` with the call signature of our model: x [b, s] -> logits [b, s, V]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, attention_mask=None, position_ids=None):
        return self.model(
            input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids
        ).logits
