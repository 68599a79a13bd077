"""The three ways an evaluation runs the network, behind one operation:

    net.run(inputs: ModelInputs, read, shape) -> read(hidden [s, b, h], head), fp32 of `shape`

`read` is what the training loss is elsewhere (`Engine.infer`'s contract): it sees the last
hidden states and the head, whose `full_logits(hidden [s, b, h]) -> [b, s, V]` gives fp32 logits
over the whole vocabulary with the never-predicted ids at -inf. Scoring projects only the
positions it scores (`scoring.scored_positions_read`), never the [b, s, V] logits of a batch: at
LLaDA's 126k vocabulary those would not fit next to it.

    ModuleNet   a `DLMTransformer` on this process (a checkpoint, `load_model`)
    EngineNet   the training engine's no-grad forward (`Engine.infer`: any layout, PP included)
    HFNet       an exported directory's `DLMForMaskedLM` (plain PyTorch)
"""

from __future__ import annotations

import torch

from pretrain.model.inputs import ModelInputs


def to_device(inputs: ModelInputs, device) -> ModelInputs:
    """The inputs (built on the host) on `device`; the attention's segments stay host-known."""
    from pretrain.model.masks import AttentionMask

    att = inputs.attention
    if att is not None:
        pattern = None if att.pattern is None else att.pattern.to(device)
        docs = None if att.documents is None else att.documents.map(lambda t: t.to(device))
        att = AttentionMask(pattern, docs)
    positions = None if inputs.position_ids is None else inputs.position_ids.to(device)
    return ModelInputs(inputs.tokens.to(device), positions, att)


class ModuleNet:
    """Our training model (`DLMTransformer`) on this process, at TP = PP = 1."""

    def __init__(self, module):
        self.module = module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.module.vocab_size

    @torch.no_grad()
    def run(self, inputs: ModelInputs, read, shape) -> torch.Tensor:
        x = to_device(inputs, self.device)
        out = self.module(
            x.tokens, attention_mask=x.attention, position_ids=x.position_ids, loss_fn=read
        )
        return out.float()


class EngineNet:
    """The training engine of a run (`pretrain.run.Run`): every rank of a replica calls `run`
    with the same inputs (collective over the pipeline under pipeline parallelism)."""

    def __init__(self, engine, *, device, vocab_size: int):
        self.engine, self._device, self._vocab = engine, device, vocab_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def run(self, inputs: ModelInputs, read, shape) -> torch.Tensor:
        return self.engine.infer(to_device(inputs, self._device), read, tuple(shape))


class _HFHead:
    """`OutputHead.full_logits` for an exported model (its hidden states are already normed)."""

    def __init__(self, model):
        self.model = model

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden.transpose(0, 1)).float()  # [b, s, V]
        return logits.masked_fill(self.model.excluded_ids(hidden.device), float("-inf"))


class HFNet:
    """An exported directory's `DLMForMaskedLM` (SDPA; dense boolean masks)."""

    def __init__(self, model):
        self.model = model
        self.head = _HFHead(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.no_grad()
    def run(self, inputs: ModelInputs, read, shape) -> torch.Tensor:
        x = to_device(inputs, self.device)
        mask = None if x.attention is None else x.attention.dense()
        out = self.model.model(x.tokens, attention_mask=mask, position_ids=x.position_ids)
        return read(out.last_hidden_state.transpose(0, 1), self.head).float()  # [s, b, h]


def read_logits(hidden, head) -> torch.Tensor:
    return head.full_logits(hidden)  # [b, s, V] fp32


def logits_fn(net, objective):
    """x [b, s] -> the objective-aligned fp32 logits [b, s, V] (what the samplers call): the
    objective's generation pattern and one-token shift (`generation_mask`, `align_logits`)."""
    from pretrain.model.masks import AttentionMask

    def logits(x: torch.Tensor) -> torch.Tensor:
        pattern = objective.generation_mask(x.shape[1], x.device)
        inputs = ModelInputs(x, None, None if pattern is None else AttentionMask(pattern))
        raw = net.run(inputs, read_logits, (*x.shape, net.vocab_size))
        return objective.align_logits(raw).to(x.device)

    return logits
