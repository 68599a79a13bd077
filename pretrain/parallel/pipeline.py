"""Pipeline parallelism: the model's own stages as a DeepSpeed `PipelineModule`, and its engine.

    [EmbeddingStage, LayerStage x N, HeadStage]  --loss_fn-->  the caller's loss on the hidden

The stages are the single-device model's modules (TokenEmbedding, Megatron TransformerLayer,
OutputHead), so the weights, their canonical names and their TP shards are the same as in the
non-pipelined model. DeepSpeed balances the transformer layers over the stages
(`partition_method="type:LayerStage"`); the embedding sits on the first stage and the head on
the last. Between stages travels the packed tuple of `pretrain.model.inputs`

    (hidden [s, b, h], position_ids, pattern, document_ids)

so every layer attends under the micro-batch's own mask and positions; each stage prepares the
mask for its attention backend once per forward (`_StageInputs`), not once per layer.

The last stage's `loss_fn` runs the caller's function on (hidden, head): DeepSpeed calls it
with the stage's output and labels only, so the engine queues, per micro-batch, the closure
that knows the micro-batch (`_LossQueue`); the micro-batches reach the last stage in the order
they were queued. The data (and the diffusion corruption, keyed by replica and step) is
prepared on every stage of a replica, so the first stage's input and the last stage's loss
come from the same draw without communication.
"""

from __future__ import annotations

import re

import torch
from megatron.core.transformer import TransformerConfig

from pretrain.config import ModelConfig
from pretrain.model.attention import get_attention_backend
from pretrain.model.inputs import ModelInputs, signature, unpack_side
from pretrain.model.layers import RotaryEmbedding, build_layer
from pretrain.model.transformer import (
    OutputHead,
    TokenEmbedding,
    prepare_mask,
    rope_table,
    run_layer,
)
from pretrain.parallel.engine import Engine, _mean


class _StageInputs:
    """The side inputs of the micro-batch a stage is running, in the form its layers take
    (rope table, prepared mask), computed by the stage's first layer and reused by the others:
    they see the very same side tensors, which this compares by identity (holding them, so
    their memory cannot be reused while cached)."""

    def __init__(self, backend: str):
        self.prepare = get_attention_backend(backend).prepare
        self._key: tuple | None = None
        self._value: tuple | None = None

    def get(self, rotary: RotaryEmbedding, seq_len: int, side: tuple, dtype) -> tuple:
        if self._key is None or any(a is not b for a, b in zip(self._key, side, strict=True)):
            position_ids, attention = unpack_side(*side)
            rope = rope_table(rotary, seq_len, position_ids, dtype)
            self._key, self._value = side, (rope, prepare_mask(self.prepare, attention))
        return self._value


class EmbeddingStage(TokenEmbedding):
    """(tokens [b, s], *side) -> (hidden [s, b, h], *side)."""

    def forward(self, packed):
        tokens, *side = packed
        return (super().forward(tokens), *side)


class LayerStage(torch.nn.Module):
    """One transformer layer: (hidden [s, b, h], *side) -> (hidden, *side)."""

    def __init__(
        self,
        model: ModelConfig,
        config: TransformerConfig,
        layer_number: int,
        shared: _StageInputs,
        moe_groups=None,
    ):
        super().__init__()
        self.layer = build_layer(model, config, layer_number, moe_groups)
        self.rotary = RotaryEmbedding(config.kv_channels, model.rope_base)
        self.recompute = model.activation_checkpointing
        self.tp = config.tensor_model_parallel_size
        self.shared = [shared]  # a list: not a submodule, one object for every layer

    def forward(self, packed):
        hidden, *side = packed
        # Under sequence parallelism a stage receives [s / tp, b, h]; attention sees all s.
        seq = hidden.shape[0] * (self.tp if self.layer.config.sequence_parallel else 1)
        rope, mask = self.shared[0].get(self.rotary, seq, tuple(side), hidden.dtype)
        hidden = run_layer(self.layer, hidden, mask, rope, self.recompute and self.training)
        return (hidden, *side)


class HeadStage(OutputHead):
    """(hidden, *side) -> hidden: the head's weights live here; the caller's loss applies them
    (`OutputHead.token_ce`, `full_logits`, `energy`) to the last hidden states."""

    def forward(self, packed):
        return packed[0]


class _LossQueue:
    """DeepSpeed's `loss_fn(outputs, labels)` on the last stage: pops the next queued closure
    and runs it on (hidden, head), keeping what it returns besides the loss."""

    def __init__(self):
        self.head: HeadStage | None = None
        self.pending: list = []
        self.results: list = []

    def __call__(self, hidden: torch.Tensor, labels) -> torch.Tensor:
        loss, payload = self.pending.pop(0)(hidden, self.head)
        self.results.append(payload)
        return loss

    def take(self) -> list:
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} queued micro-batches were never run")
        out, self.results = self.results, []
        return out


def build_pipeline_module(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    vocab_size: int,
    padded_vocab: int,
    mask_token_id: int,
    topology,
    tp_rank: int,
    tp_group,
    moe_groups=None,
):
    from deepspeed.pipe import LayerSpec, PipelineModule

    loss = _LossQueue()
    shared = _StageInputs(model.attention_backend)
    specs = [LayerSpec(EmbeddingStage, config, padded_vocab)]
    specs += [
        LayerSpec(LayerStage, model, config, i + 1, shared, moe_groups)
        for i in range(model.num_layers)
    ]
    specs.append(
        LayerSpec(
            HeadStage,
            config,
            vocab_size,
            padded_vocab,
            (mask_token_id,),
            tp_rank=tp_rank,
            tp_group=tp_group,
            recompute=model.sparse_output_recompute,
        )
    )
    module = PipelineModule(
        layers=specs, topology=topology, loss_fn=loss, partition_method="type:LayerStage"
    )
    loss.head = next((m for m in module.modules() if isinstance(m, HeadStage)), None)
    return module, loss


_PIPE_NAME = re.compile(r"(\d+)\.(?:layer\.)?(.+)")


def canonical_pipe_name(name: str, num_layers: int) -> str:
    """`PipelineModule` parameter name -> canonical (single-device model) name.

    Layer index 0 is the embedding, 1..N the transformer layers, N+1 the head.
    """
    match = _PIPE_NAME.fullmatch(name)
    if match is None:
        raise KeyError(f"unexpected pipeline parameter name '{name}'")
    index, rest = int(match.group(1)), match.group(2)
    if index == 0:
        return f"embedding.{rest}"
    if index == num_layers + 1:
        return f"head.{rest}"
    return f"layers.{index - 1}.{rest}"


class PipelineParallelEngine(Engine):
    """DeepSpeed's PipelineEngine (1F1B schedule, micro-batches = train.grad_accum_steps)."""

    def __init__(self, ds, rt, loss: _LossQueue, num_layers: int, **options):
        super().__init__(ds, rt, **options)
        self.loss = loss
        self.num_layers = num_layers
        self._signature = None
        self.last_stage = ds.is_last_stage()

    def _named(self, named):
        return [(canonical_pipe_name(name, self.num_layers), t) for name, t in named]

    def _feed(self, items: list[tuple[ModelInputs, object]]):
        """Queue the closures on the last stage and return DeepSpeed's data iterator. When the
        micro-batches' shapes differ from the previous call's, DeepSpeed is told to announce
        them to the next stages again (it sends shapes once, then reuses its buffers)."""
        packed = [inputs.pack() for inputs, _ in items]
        shapes = signature(packed[0])
        if any(signature(p) != shapes for p in packed):
            raise ValueError("the micro-batches of one pipeline call must share their shapes")
        if shapes != self._signature:
            self.ds.reset_activation_shape()
            self._signature = shapes
        if self.last_stage:
            self.loss.pending.extend(fn for _, fn in items)
        dummy = torch.zeros(1, device=self.rt.device)  # labels: the closures hold the batch
        return iter([(p, dummy) for p in packed])

    def train_step(self, batches, loss_fn):
        items = [
            (b.model_inputs(), lambda hidden, head, b=b: loss_fn(hidden, head, b)) for b in batches
        ]
        with self.kernels():
            self.ds.train_batch(data_iter=self._feed(items))
        self.after_step()
        return _mean(self.loss.take())

    @torch.no_grad()
    def eval_step(self, batch, loss_fn):
        items = [(batch.model_inputs(), lambda hidden, head: loss_fn(hidden, head, batch))]
        with self.kernels():
            self.ds.eval_batch(self._feed(items), num_micro_batches=1)
        return _mean(self.loss.take())

    @torch.no_grad()
    def infer(self, inputs, read, shape):
        def run(hidden, head):
            # contiguous: a collective sends the storage as it lies in memory
            return torch.zeros((), device=hidden.device), read(hidden, head).float().contiguous()

        with self.kernels():
            self.ds.eval_batch(self._feed([(inputs, run)]), num_micro_batches=1)
        results = self.loss.take()
        out = results[0] if results else torch.empty(shape, device=self.rt.device)
        # the last stage has the answer: its pipeline group's other stages receive it
        grid = self.ds.grid
        src = grid.stage_to_global(self.ds.num_stages - 1)
        torch.distributed.broadcast(out, src=src, group=grid.get_pipe_parallel_group())
        return out


__all__ = [
    "PipelineParallelEngine",
    "build_pipeline_module",
    "canonical_pipe_name",
]
