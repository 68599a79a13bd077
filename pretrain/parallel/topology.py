"""One topology for Megatron-core and DeepSpeed: sizes, validation, rank coordinates, adapters.

Ranks are laid out tensor-parallel fastest, then data-parallel, then pipeline (Megatron-core's
default order). DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model; model fastest)
is the same layout, so the pipeline engine built from `deepspeed_topology()` and Megatron's
`parallel_state` agree on every rank's coordinates; `MegatronMPU` hands Megatron's groups to a
non-pipelined DeepSpeed engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config, ModelConfig
from pretrain.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    tp: int
    pp: int
    dp: int
    ep: int = 1
    """Expert-parallel size: groups of `ep` consecutive data-parallel ranks split the experts
    (Megatron-core's expert layout with expert TP = TP: data rank = ep rank + ep * expert-data
    rank)."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return rank // (self.tp * self.dp), (rank // self.tp) % self.dp, rank % self.tp

    def expert_coordinates(self, rank: int) -> tuple[int, int]:
        """(expert-parallel rank, expert-data-parallel rank) of a global rank."""
        dp_rank = self.coordinates(rank)[1]
        return dp_rank % self.ep, dp_rank // self.ep

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> Topology:
        """Derive dp from the world size and check that the layout fits the world and the model."""
        tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor_parallel ({tp}) x "
                f"parallel.pipeline_parallel ({pp})"
            )
        ep = cfg.parallel.expert_parallel
        topo = cls(tp=tp, pp=pp, dp=world_size // (tp * pp), ep=ep)
        topo.validate(cfg.model, zero_stage=cfg.parallel.zero_stage)
        return topo

    def validate(self, m: ModelConfig, *, zero_stage: int) -> None:
        """The layout must split the model evenly and be one DeepSpeed supports."""
        tp, pp = self.tp, self.pp
        checks = [
            (m.num_attention_heads % tp, f"model.num_attention_heads ({m.num_attention_heads})"),
            (
                (m.num_query_groups or m.num_attention_heads) % tp,
                f"model.num_query_groups ({m.num_query_groups or m.num_attention_heads})",
            ),
            (m.ffn_hidden_size % tp, f"model.ffn_hidden_size ({m.ffn_hidden_size})"),
            (
                m.make_vocab_size_divisible_by % tp,
                f"model.make_vocab_size_divisible_by ({m.make_vocab_size_divisible_by})",
            ),
        ]
        for remainder, what in checks:
            if remainder:
                raise ConfigError(f"{what} must be divisible by parallel.tensor_parallel ({tp})")
        if m.num_layers < pp:
            raise ConfigError(
                f"model.num_layers ({m.num_layers}) must be >= parallel.pipeline_parallel ({pp})"
            )
        if self.dp % self.ep:
            raise ConfigError(
                f"parallel.expert_parallel ({self.ep}) must divide the data-parallel size "
                f"({self.dp} = world size / (tensor_parallel x pipeline_parallel))"
            )
        if self.ep > 1 and m.moe.num_experts % self.ep:
            raise ConfigError(
                f"model.moe.num_experts ({m.moe.num_experts}) must be divisible by "
                f"parallel.expert_parallel ({self.ep})"
            )
        if pp > 1 and zero_stage > 1:
            raise ConfigError(
                f"parallel.zero_stage {zero_stage} cannot be combined with pipeline "
                "parallelism (DeepSpeed's pipeline engine supports ZeRO stages 0 and 1)"
            )

    def deepspeed_topology(self):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)


class MegatronMPU:
    """DeepSpeed's `mpu` protocol over Megatron-core's process groups (non-pipelined engines).

    DeepSpeed calls the tensor-parallel group its "model parallel" group: it uses it to count
    TP-replicated parameters once in the gradient norm and to keep ZeRO partitions per TP rank.
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        import torch.distributed as dist

        return dist.get_process_group_ranks(self.get_data_parallel_group())
