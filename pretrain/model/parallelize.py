"""The model for this process's place in the layout: built from the config, its tensor-parallel
shards initialised from the canonical (layout-independent) init.

The model code (`transformer.py`) is written for one device and is handed its TP rank and group;
this is where they come from (Megatron-core's process groups).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from pretrain.config import ModelConfig
from pretrain.model.sharding import initialize, mark_tensor_parallel
from pretrain.model.transformer import DLMTransformer, megatron_config


def tensor_parallel_place() -> tuple[int, int, object]:
    """(TP rank, TP size, TP group) of this process."""
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_group(),
    )


def build_model(
    model: ModelConfig,
    *,
    vocab_size: int,
    mask_token_id: int,
    params_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    sequence_parallel: bool = False,
) -> DLMTransformer:
    """Build the (non-pipelined) model for the current process groups, initialised from `seed`.

    The weights are the TP shards of the canonical init: identical for every TP layout.
    """
    tp_rank, tp, group = tensor_parallel_place()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = megatron_config(
        model,
        params_dtype=params_dtype,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        sequence_parallel=sequence_parallel,
    )
    net = DLMTransformer(
        model,
        config,
        vocab_size=vocab_size,
        excluded_token_ids=(mask_token_id,),
        tp_rank=tp_rank,
        tp_group=group,
    )
    mark_tensor_parallel(net.named_parameters())
    initialize(
        net.named_parameters(),
        seed=seed,
        std=model.init_std,
        num_layers=model.num_layers,
        tp_rank=tp_rank,
        tp_size=tp,
    )
    return net
