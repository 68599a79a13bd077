"""Pipeline parallelism: the DLM as a DeepSpeed `PipelineModule` layer list.

    [EmbeddingPipe, TransformerLayerPipe x N, HeadPipe]  --loss_fn-->  weighted diffusion loss

The stages reuse the single-device model's modules (TokenEmbedding, Megatron TransformerLayer,
OutputHead), so the weights, their canonical names and their TP shards are the same as in the
non-pipelined model. DeepSpeed balances the transformer layers over the stages
(`partition_method="type:TransformerLayerPipe"`); the embedding sits on the first stage and the
head on the last. Activations travel between stages as hidden [s, b, h].

The diffusion corruption runs before the model on every stage of a data-parallel replica
(seeded by replica and step), so the first stage's input x_t and the last stage's loss weights
come from the same draw without any communication.
"""

from __future__ import annotations

import re

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import build_module

from pretrain.config import ModelConfig
from pretrain.diffusion.objective import DiffusionBatch
from pretrain.model.layers import RotaryEmbedding, transformer_layer_spec
from pretrain.model.transformer import OutputHead, TokenEmbedding, run_layer


class EmbeddingPipe(TokenEmbedding):
    """tokens [b, s] -> hidden [s, b, h]."""


class TransformerLayerPipe(torch.nn.Module):
    """One transformer layer: hidden [s, b, h] -> [s, b, h] (bidirectional, RoPE per stage)."""

    def __init__(self, model: ModelConfig, config: TransformerConfig, layer_number: int):
        super().__init__()
        self.layer = build_module(
            transformer_layer_spec(model.attention_backend),
            config=config,
            layer_number=layer_number,
        )
        self.rotary = RotaryEmbedding(config.kv_channels, model.rope_base)
        self.recompute = model.activation_checkpointing
        self.tp = config.tensor_model_parallel_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Under sequence parallelism a stage receives [s / tp, b, h]; attention sees all s.
        seq = hidden.shape[0] * (self.tp if self.layer.config.sequence_parallel else 1)
        rope = self.rotary(seq)
        return run_layer(self.layer, hidden, None, rope, self.recompute and self.training)


class HeadPipe(OutputHead):
    """hidden [s, b, h] -> logits [s, b, V_pad / tp]."""


class PipelineLoss:
    """`loss_fn(logits, labels)` of the pipeline: per-token CE, then the objective's weighting.

    DeepSpeed only returns the loss, so the objective's metrics of each micro-batch are kept here
    (on the last stage) for the trainer to collect.
    """

    def __init__(self, objective):
        self.objective = objective
        self.metrics: list[dict[str, torch.Tensor]] = []

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        targets, loss_weights, masked = labels
        ce = OutputHead.cross_entropy(logits, targets)
        batch = DiffusionBatch(
            inputs=targets, targets=targets, loss_weights=loss_weights, masked=masked, t=None
        )
        loss, metrics = self.objective.loss(ce, batch)
        self.metrics.append({"loss": loss.detach(), **metrics})
        return loss

    def pop(self) -> list[dict[str, torch.Tensor]]:
        out, self.metrics = self.metrics, []
        return out


def build_pipeline_module(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    vocab_size: int,
    padded_vocab: int,
    mask_token_id: int,
    topology,
    loss: PipelineLoss,
):
    from deepspeed.pipe import LayerSpec, PipelineModule

    specs = [LayerSpec(EmbeddingPipe, config, padded_vocab)]
    specs += [
        LayerSpec(TransformerLayerPipe, model, config, i + 1) for i in range(model.num_layers)
    ]
    specs.append(LayerSpec(HeadPipe, config, vocab_size, padded_vocab, (mask_token_id,)))
    return PipelineModule(
        layers=specs,
        topology=topology,
        loss_fn=loss,
        partition_method="type:TransformerLayerPipe",
    )


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


def pipeline_batches(batches: list[DiffusionBatch]):
    """The (inputs, labels) micro-batches DeepSpeed's pipeline engine pulls from its iterator."""
    for b in batches:
        yield b.inputs, (b.targets, b.loss_weights, b.masked)
