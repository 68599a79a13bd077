"""Process-level setup: torch.distributed, Megatron-core process groups, device and precision.

One process per device. Under torchrun/slurm the usual RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT variables are read; a plain `dlm train` is a world of one on a free port.
Megatron-core owns the process groups (it orders tensor-parallel ranks fastest, then data, then
pipeline); DeepSpeed is handed the same groups, so one topology drives both.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.errors import ConfigError
from pretrain.parallel.topology import Topology


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype
    """Dtype of the model's parameters."""
    autocast: bool
    """Compute in bf16 under torch.autocast while parameters stay fp32."""
    topology: Topology
    dp_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp(self) -> int:
        return self.topology.tp

    @property
    def pp(self) -> int:
        return self.topology.pp

    @property
    def dp(self) -> int:
        return self.topology.dp

    @property
    def ep(self) -> int:
        return self.topology.ep

    @property
    def ep_rank(self) -> int:
        return self.topology.expert_coordinates(self.rank)[0]

    @property
    def tp_rank(self) -> int:
        return self.topology.coordinates(self.rank)[2]

    @property
    def pp_rank(self) -> int:
        return self.topology.coordinates(self.rank)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_precision(cfg: Config, device: torch.device) -> str:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16-autocast" and device.type != "cuda":
        # Megatron-core's linear layers declare their autocast behaviour for CUDA only; on CPU
        # their backward mixes bf16 and fp32 operands.
        raise ConfigError("train.precision 'bf16-autocast' needs a CUDA device")
    return precision


def _skip_cpu_shm_op() -> None:
    """Keep DeepSpeed's CPU communicator from JIT-compiling its shared-memory all-reduce.

    DeepSpeed >= 0.16 builds the `deepspeed_shm_comm` C++ op whenever a communicator starts on the
    CPU accelerator (about a minute of compiling on 2 cores, per process that finds the build
    stale), and a process killed during the build leaves torch's extension lock behind, which
    makes every later start wait on it forever. The op only serves DeepSpeed's
    `inference_all_reduce`; our collectives are torch.distributed's (gloo). Marking the op
    incompatible is what DeepSpeed itself does off Linux: the communicator then uses gloo only.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def shutdown_runtime() -> None:
    """Destroy torch.distributed's process groups before this process exits, after a command
    that succeeded on every rank (after a failure a peer may still be inside a collective, and
    the launcher tears the job down anyway). Left to the interpreter's teardown, gloo's worker
    threads can release tensors after Python has finalised and abort the process (SIGABRT,
    "terminate called without an active exception"): a finished run exiting as failed. Only
    for process entry points: in-process callers (the tests) keep reusing the runtime."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_runtime(cfg: Config) -> Runtime:
    """Initialise torch.distributed (if needed) and Megatron-core's parallel state."""
    import deepspeed
    from megatron.core import parallel_state

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        _skip_cpu_shm_op()  # before any DeepSpeed communicator starts (here or in initialize)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    topology = Topology.from_config(cfg, dist.get_world_size())
    tp, pp, ep = topology.tp, topology.pp, topology.ep
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
        )
    elif (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    ) != (tp, pp, ep):
        # DeepSpeed caches process groups per process, so a layout cannot change in-process.
        raise RuntimeError("this process already runs another parallel layout; start a new one")
    precision = resolve_precision(cfg, device)
    rank = dist.get_rank()
    # Megatron's groups and our topology must agree on where this rank sits.
    pp_rank, dp_rank, tp_rank = topology.coordinates(rank)
    assert (pp_rank, dp_rank, tp_rank) == (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
    ), f"rank {rank}: topology and Megatron-core disagree on the rank layout"
    assert (
        topology.expert_coordinates(rank)[0] == parallel_state.get_expert_model_parallel_rank()
    ), f"rank {rank}: topology and Megatron-core disagree on the expert-parallel rank"
    return Runtime(
        rank=rank,
        world_size=topology.world_size,
        local_rank=int(os.environ["LOCAL_RANK"]),
        device=device,
        dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        autocast=precision == "bf16-autocast",
        topology=topology,
        dp_rank=dp_rank,
    )
