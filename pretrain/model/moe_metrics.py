"""Router metrics for the training log (and MLflow), from the routers' on-device statistics.

Each `Router` adds, per training forward, its routed assignments per expert and the values of
its losses to a small float64 buffer (`pretrain.model.moe.STAT_SCALARS`); reading them here is
one all-reduce over the job of a [num_layers, E + 5] table (every layer lives on one pipeline
stage; the data-parallel ranks add their own tokens; tensor-parallel ranks hold copies, so only
TP rank 0 contributes) and one host copy, once per log line. The buffers are then cleared, so
each log line covers the steps since the previous one.

    moe/expert_load_max, moe/expert_load_min   the busiest / idlest expert's share of the routed
                                               assignments, relative to an even split (1 = even),
                                               over all experts of all MoE layers
    moe/expert_load_entropy                    entropy of each layer's assignment shares over
                                               log(E) (1 = even), mean over the MoE layers
    moe/dropped_fraction                       assignments dropped by expert capacity
                                               (model.moe.capacity_factor), of all routed ones
    moe/load_balancing_loss, moe/z_loss        the terms added to the training loss, summed over
                                               the MoE layers (mean per micro-batch)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pretrain.model.moe import STAT_SCALARS, moe_blocks


def router_metrics(
    module: torch.nn.Module, num_layers: int, num_experts: int, *, count: bool
) -> dict[str, float]:
    """Collective over the job: every rank calls it at the same steps. `count`: whether this
    rank's statistics are added (TP rank 0 of each replica and stage)."""
    blocks = moe_blocks(module)
    device = blocks[0].router.stats.device if blocks else _device()
    table = torch.zeros(num_layers, num_experts + len(STAT_SCALARS), dtype=torch.float64)
    table = table.to(device)
    for block in blocks:
        if count:
            table[block.router.layer_number - 1] = block.router.stats
        block.router.stats.zero_()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    table = table.cpu()
    scalar = {name: table[:, num_experts + i] for i, name in enumerate(STAT_SCALARS)}
    rows = scalar["forwards"] > 0
    if not bool(rows.any()):
        return {}
    load = table[rows, :num_experts]  # [moe layers, E] routed assignments
    share = load / load.sum(dim=1, keepdim=True).clamp(min=1.0)
    entropy = -(share * share.clamp(min=1e-30).log()).sum(dim=1) / math.log(num_experts)
    forwards = scalar["forwards"][rows]
    assignments = float(scalar["assignments"][rows].sum())
    return {
        "moe/expert_load_max": float(share.max() * num_experts),
        "moe/expert_load_min": float(share.min() * num_experts),
        "moe/expert_load_entropy": float(entropy.mean()),
        "moe/dropped_fraction": float(scalar["dropped"][rows].sum()) / max(assignments, 1.0),
        "moe/load_balancing_loss": float((scalar["load_balancing_loss"][rows] / forwards).sum()),
        "moe/z_loss": float((scalar["z_loss"][rows] / forwards).sum()),
    }


def _device() -> torch.device:
    """The device collectives run on here (a stage without MoE layers has no statistics)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
