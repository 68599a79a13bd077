"""Building an engine for this rank's place in the layout: the model (whole, or this pipeline
stage's part), its weights, the optimizer and LR schedule, and the DeepSpeed engine around them.

The optimizer is ours (`optim.master_weights=fused`: `MasterWeightAdamW`, ZeRO-0 or sharded
over data parallelism as ZeRO-1, with or without pipeline parallelism) or a plain torch AdamW
that DeepSpeed wraps in its bf16/ZeRO optimizers (ZeRO 0-3; `deepspeed`). DeepSpeed's own Adam
variants need compiled ops, and a torch optimizer keeps CPU and GPU runs identical.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from pretrain.config import Config
from pretrain.config.schema import padded_vocab_size
from pretrain.model.fp8 import apply_fp8
from pretrain.model.moe import (
    canonical_experts,
    expert_groups,
    experts_kept,
    set_router_grad_scale,
)
from pretrain.model.sharding import initialize, mark_tensor_parallel
from pretrain.model.transformer import COMPILED, DLMTransformer, OutputHead, megatron_config
from pretrain.parallel.engine import DataParallelEngine, Engine
from pretrain.parallel.master_adamw import MasterWeightAdamW
from pretrain.parallel.runtime import Runtime

# (canonical name, local parameter) pairs -> fills the parameters (a checkpoint's weights)
WeightLoader = Callable[[list[tuple[str, torch.nn.Parameter]]], None]


def uses_fused_optimizer(cfg: Config) -> bool:
    """`optim.master_weights`: `fused`, or `auto` where the fused optimizer runs (ZeRO 0/1)."""
    choice = cfg.optim.master_weights
    return choice == "fused" or (choice == "auto" and cfg.parallel.zero_stage <= 1)


def deepspeed_config(cfg: Config, rt: Runtime) -> dict:
    # With our own master-weight optimizer DeepSpeed runs in plain mode around it: no fp32
    # copies, no clipping, no ZeRO partitioning (the optimizer shards its own state).
    own = uses_fused_optimizer(cfg)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": 0.0 if own else cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": 0 if own else cfg.parallel.zero_stage,
            # Overlap needs side streams: only where there is a GPU to overlap on.
            "overlap_comm": cfg.parallel.overlap_comm and rt.device.type == "cuda",
            "contiguous_gradients": True,
            "reduce_bucket_size": cfg.parallel.bucket_size,
            "allgather_bucket_size": cfg.parallel.bucket_size,
        },
        "bf16": {
            "enabled": rt.dtype == torch.bfloat16 and not own,
            # ZeRO-0's bf16 optimizer: fold each gradient into its fp32 copy as it is produced
            "immediate_grad_update": True,
        },
        "torch_autocast": {"enabled": rt.autocast, "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed's pipeline splits activations across TP ranks before sending them, assuming
        # they are identical on every TP rank; under sequence parallelism each holds its own slice.
        "pipeline": {
            "pipe_partitioned": not cfg.parallel.sequence_parallel,
            "grad_partitioned": not cfg.parallel.sequence_parallel,
        },
        "steps_per_print": 2**62,  # we log ourselves
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every forward and step (its
        # default): two host waits per step that drain the GPU's queue (measured: 5-6 ms of
        # device idle per step on one H200). We time steps ourselves.
        "timers": {"throughput": {"enabled": False}},
        "dump_state": False,
    }


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(module: torch.nn.Module, cfg: Config, rt: Runtime) -> torch.optim.Optimizer:
    """AdamW; norms (1-D weights) are not decayed, matrices and embeddings are."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if uses_fused_optimizer(cfg):
        from megatron.core import parallel_state

        return MasterWeightAdamW(
            groups,
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.adam_eps,
            max_grad_norm=cfg.optim.grad_clip,
            dp_group=parallel_state.get_data_parallel_group(),
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            model_parallel_group=parallel_state.get_model_parallel_group(),
            expert_dp_group=parallel_state.get_expert_data_parallel_group()
            if cfg.model.moe.enabled
            else None,
            shard=cfg.parallel.zero_stage == 1,
            skip_nonfinite=cfg.train.on_nonfinite == "skip",
        )
    return torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.adam_eps,
        fused=rt.device.type == "cuda",
    )


SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def attention_kernels(cfg: Config, rt: Runtime) -> Callable[[], contextlib.AbstractContextManager]:
    """A context (entered around each forward) that ranks PyTorch's fused attention kernels as
    `model.sdpa_backends` says. The backward of an SDPA call uses the kernel its forward chose.
    CPU runs have one kernel family, so nothing is ranked there."""
    if rt.device.type != "cuda":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, SDPA_BACKENDS[name]) for name in cfg.model.sdpa_backends]
    return lambda: sdpa_kernel(backends, set_priority=True)


def compile_model(module: torch.nn.Module, cfg: Config) -> None:
    """torch.compile the transformer layers (the embedding and head, with their vocab-parallel
    collectives, stay eager; the head's loss is compiled on its own, or with `compile_head` on
    one TP rank each chunk of the head).

    `layer`: one graph serves every layer of the same shape. `trunk`: the whole layer stack is
    one graph, so the host enters compiled code twice per micro-batch instead of twice per
    layer; on an H100 the per-layer entries left ~0.25 ms idle gaps each (bench/README.md).
    """
    mode = None if cfg.model.compile_mode == "default" else cfg.model.compile_mode
    trunk = cfg.model.compile_scope == "trunk" and isinstance(module, DLMTransformer)
    if trunk:
        module.trunk = torch.compile(module.trunk, mode=mode)
    for layer in module.modules():
        if isinstance(layer, TransformerLayer) and not trunk:
            layer.compile(mode=mode)
            setattr(layer, COMPILED, True)
        elif isinstance(layer, OutputHead):
            layer.compile_loss(whole_chunk=cfg.model.compile_head)


def build_engine(
    cfg: Config,
    rt: Runtime,
    *,
    vocab_size: int,
    mask_token_id: int,
    load_weights: WeightLoader | None = None,
) -> Engine:
    """Build the model for this rank's place in the layout, fill its weights (from a checkpoint,
    or the seeded canonical init) and wrap it in the DeepSpeed engine of the layout."""
    import deepspeed
    from megatron.core import parallel_state

    from pretrain.parallel.pipeline import (
        PipelineParallelEngine,
        build_pipeline_module,
        canonical_pipe_name,
    )
    from pretrain.parallel.topology import MegatronMPU

    config = megatron_config(
        cfg.model,
        params_dtype=rt.dtype,
        tensor_parallel_size=rt.tp,
        pipeline_parallel_size=rt.pp,
        sequence_parallel=cfg.parallel.sequence_parallel,
        expert_parallel_size=rt.ep,
    )
    tp_group = parallel_state.get_tensor_model_parallel_group()
    groups = expert_groups() if cfg.model.moe.enabled else None
    if rt.pp == 1:
        module = DLMTransformer(
            cfg.model,
            config,
            vocab_size=vocab_size,
            excluded_token_ids=(mask_token_id,),
            tp_rank=rt.tp_rank,
            tp_group=tp_group,
            moe_groups=groups,
        )
        named = canonical_experts(module, module.named_parameters())
    else:
        module, loss = build_pipeline_module(
            cfg.model,
            config,
            vocab_size=vocab_size,
            padded_vocab=padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by),
            mask_token_id=mask_token_id,
            topology=rt.topology.deepspeed_topology(),
            tp_rank=rt.tp_rank,
            tp_group=tp_group,
            moe_groups=groups,
        )
        named = canonical_experts(
            module,
            [
                (canonical_pipe_name(n, cfg.model.num_layers), p)
                for n, p in module.named_parameters()
            ],
        )
    # the router's losses get the gradient scale DeepSpeed gives the objective's loss
    set_router_grad_scale(module, 1.0 / cfg.train.grad_accum_steps)
    mark_tensor_parallel(named)
    if load_weights is not None:
        load_weights(named)
    else:
        initialize(
            named,
            seed=cfg.train.seed,
            std=cfg.model.init_std,
            num_layers=cfg.model.num_layers,
            tp_rank=rt.tp_rank,
            tp_size=rt.tp,
        )
    module.to(rt.device)
    apply_fp8(module, cfg.model, device=rt.device)  # model.fp8: FP8 matmuls, same parameters
    if cfg.model.compile:
        compile_model(module, cfg)
    optimizer = build_optimizer(module, cfg, rt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step,
            warmup=cfg.optim.warmup_steps,
            total=cfg.train.steps,
            min_ratio=cfg.optim.min_lr_ratio,
        ),
    )
    with experts_kept(module):
        ds, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, rt),
            # DeepSpeed derives a pipeline engine's groups from the PipelineModule's topology
            # and refuses an mpu next to it; the plain engine takes Megatron's groups (mpu).
            mpu=MegatronMPU() if rt.pp == 1 else None,
        )
    if isinstance(optimizer, MasterWeightAdamW):
        # the optimizer reduces its fp32 gradients itself (all-reduce, or reduce-scatter)
        ds.enable_backward_allreduce = False
        ds.pipeline_enable_backward_allreduce = False
    options = {
        "kernels": attention_kernels(cfg, rt),
        "moe_shape": (cfg.model.num_layers, cfg.model.moe.num_experts)
        if cfg.model.moe.enabled
        else None,
    }
    if rt.pp == 1:
        return DataParallelEngine(ds, rt, **options)
    return PipelineParallelEngine(ds, rt, loss, cfg.model.num_layers, **options)
