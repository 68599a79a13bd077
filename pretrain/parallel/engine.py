"""DeepSpeed engines behind one small interface the trainer uses for every layout.

    DataParallelEngine      pipeline_parallel = 1: DeepSpeedEngine over the whole model, with
                            Megatron's groups as `mpu` (TP inside the layers, ZeRO 0-3 over DP)
    PipelineParallelEngine  pipeline_parallel > 1: DeepSpeed PipelineEngine over the layer list
                            (1F1B schedule, micro-batches = train.grad_accum_steps, ZeRO 0-1)

Both take the optimizer step's micro-batches (already corrupted by the objective) and return the
objective's metrics, averaged over the micro-batches, on the ranks that compute the loss, as
0-dim tensors left on the device: the host reads them when it logs (`host_metrics`), so a step
never waits for the GPU to finish and the host queues the next one meanwhile. The
optimizer is a plain torch AdamW handed to DeepSpeed (fused kernel on CUDA): DeepSpeed's own Adam
variants need compiled ops, and a torch optimizer keeps CPU and GPU runs identical.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from pretrain.config import Config
from pretrain.diffusion.objective import DiffusionBatch
from pretrain.model.fp8 import apply_fp8
from pretrain.model.sharding import initialize, mark_tensor_parallel
from pretrain.model.transformer import (
    DLMTransformer,
    OutputHead,
    megatron_config,
    padded_vocab_size,
)
from pretrain.parallel.master_adamw import MasterWeightAdamW
from pretrain.parallel.pipeline import (
    PipelineLoss,
    build_pipeline_module,
    canonical_pipe_name,
    pipeline_batches,
)
from pretrain.parallel.runtime import Runtime
from pretrain.parallel.topology import MegatronMPU

# (canonical name, local parameter) pairs -> fills the parameters (a checkpoint's weights)
WeightLoader = Callable[[list[tuple[str, torch.nn.Parameter]]], None]


def deepspeed_config(cfg: Config, rt: Runtime) -> dict:
    # With our own master-weight optimizer DeepSpeed runs in plain mode around it: it neither
    # keeps fp32 copies nor clips (the optimizer does both).
    own_master = cfg.optim.master_weights == "fused"
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": 0.0 if own_master else cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            # Overlap needs side streams: only where there is a GPU to overlap on.
            "overlap_comm": cfg.parallel.overlap_comm and rt.device.type == "cuda",
            "contiguous_gradients": True,
            "reduce_bucket_size": cfg.parallel.bucket_size,
            "allgather_bucket_size": cfg.parallel.bucket_size,
        },
        "bf16": {
            "enabled": rt.dtype == torch.bfloat16 and not own_master,
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
    if cfg.optim.master_weights == "fused":
        from megatron.core import parallel_state

        return MasterWeightAdamW(
            groups,
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.adam_eps,
            max_grad_norm=cfg.optim.grad_clip,
            dp_group=parallel_state.get_data_parallel_group(),
            tp_group=parallel_state.get_tensor_model_parallel_group(),
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


class Engine:
    """What the trainer needs from an engine, whatever the layout."""

    auxiliary = None
    """Joint-consistency auxiliary losses (`pretrain.diffusion.auxiliary.AuxiliarySet`) or None."""

    def __init__(
        self,
        ds,
        objective,
        rt: Runtime,
        *,
        kernels: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        sparse_output: bool = False,
    ):
        self.ds = ds
        self.objective = objective
        self.rt = rt
        self.kernels = kernels
        self.sparse_output = sparse_output
        """CE only at the batch's masked positions (the objective reads it nowhere else)."""

    @property
    def owns_metrics(self) -> bool:
        """True on the ranks whose metrics count: the last pipeline stage, TP rank 0."""
        return self.rt.pp_rank == self.rt.pp - 1 and self.rt.tp_rank == 0

    def global_metrics(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Average the objective's metrics over data-parallel replicas, on every rank.

        Only the last pipeline stage computes them and TP ranks duplicate them, so one rank per
        replica contributes to a sum over the world, which is then divided by the replica count.
        The sum is one all-reduce of a float64 vector on the device; nothing waits for it here.
        """
        names = tuple(self.objective.metric_names)
        if self.auxiliary is not None:  # training steps also report the auxiliary losses
            names += tuple(n for n in self.auxiliary.metric_names if n in local)
        if self.rt.world_size == 1:
            return {n: local[n] for n in names}
        device = self.rt.device
        if self.owns_metrics:
            vector = torch.stack(
                [torch.as_tensor(local[n]).to(device, torch.float64) for n in names]
            )
        else:
            vector = torch.zeros(len(names), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(vector)
        return dict(zip(names, (vector / self.rt.dp).unbind(), strict=True))

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    @property
    def grad_norm(self) -> float | None:
        """Pre-clipping global gradient norm of the last step (ZeRO stages >= 1 report it)."""
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def canonical_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError

    def train_step(self, batches: list[DiffusionBatch]) -> dict[str, float]:
        raise NotImplementedError

    def eval_step(self, batch: DiffusionBatch) -> dict[str, float]:
        raise NotImplementedError


def _mean(metrics: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-name mean over micro-batches, in float64, on the metrics' device."""
    return {k: torch.stack([m[k].double() for m in metrics]).mean() for k in metrics[0]}


def host_metrics(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Metrics as Python floats: the device-resident ones in one copy (one sync, not one per
    value); host tensors and floats cost nothing."""
    on_device = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor) and not v.is_cpu}
    out = {k: float(v) for k, v in metrics.items() if k not in on_device}
    if on_device:
        values = torch.stack([v.detach().double() for v in on_device.values()]).tolist()
        out.update(zip(on_device, values, strict=True))
    return {k: out[k] for k in metrics}


class DataParallelEngine(Engine):
    def canonical_parameters(self):
        return list(self.ds.module.named_parameters())

    def _forward(self, batch: DiffusionBatch):
        with self.kernels():
            ce = self.ds(
                batch.inputs,
                targets=batch.targets,
                attention_mask=batch.attention_mask,
                loss_positions=batch.masked if self.sparse_output else None,
                loss_count=batch.num_masked if self.sparse_output else None,
                position_ids=batch.position_ids,
            )
        loss, metrics = self.objective.loss(ce, batch)
        return loss, {"loss": loss.detach(), **metrics}

    def train_step(self, batches):
        self.ds.train()
        collected = []
        for micro, batch in enumerate(batches):
            loss, metrics = self._forward(batch)
            if self.auxiliary is not None:  # extra forwards on the same batch, one backward
                loss = loss + self.auxiliary.step_loss(self.ds, batch, micro, len(batches), metrics)
            self.ds.backward(loss)
            self.ds.step()  # DeepSpeed applies the update after the last micro-batch only
            collected.append(metrics)
        return _mean(collected)

    @torch.no_grad()
    def eval_step(self, batch):
        self.ds.eval()
        return _mean([self._forward(batch)[1]])


class PipelineParallelEngine(Engine):
    def __init__(self, ds, objective, rt, loss: PipelineLoss, num_layers: int, **options):
        super().__init__(ds, objective, rt, **options)
        self.loss = loss
        self.num_layers = num_layers

    def canonical_parameters(self):
        return [
            (canonical_pipe_name(name, self.num_layers), p)
            for name, p in self.ds.module.named_parameters()
        ]

    def train_step(self, batches):
        self.ds.train()
        with self.kernels():
            self.ds.train_batch(data_iter=pipeline_batches(batches))
        collected = self.loss.pop()
        return _mean(collected) if collected else {}

    @torch.no_grad()
    def eval_step(self, batch):
        self.ds.eval()
        with self.kernels():
            self.ds.eval_batch(pipeline_batches([batch]), num_micro_batches=1)
        collected = self.loss.pop()
        return _mean(collected) if collected else {}


def compile_model(module: torch.nn.Module, cfg: Config) -> None:
    """torch.compile the transformer layers (the embedding and head, with their vocab-parallel
    collectives, stay eager; the head's loss is compiled on its own).

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
        elif isinstance(layer, OutputHead):
            layer.compile_loss()


def build_engine(
    cfg: Config,
    rt: Runtime,
    *,
    vocab_size: int,
    mask_token_id: int,
    objective,
    load_weights: WeightLoader | None = None,
) -> Engine:
    """Build the model for this rank's place in the layout, fill its weights (from a checkpoint,
    or the seeded canonical init) and wrap it in the DeepSpeed engine of the layout."""
    import deepspeed

    from pretrain.diffusion.auxiliary import build_auxiliaries

    auxiliary = build_auxiliaries(cfg, mask_id=mask_token_id, vocab_size=vocab_size, rt=rt)

    config = megatron_config(
        cfg.model,
        params_dtype=rt.dtype,
        tensor_parallel_size=rt.tp,
        pipeline_parallel_size=rt.pp,
        sequence_parallel=cfg.parallel.sequence_parallel,
    )
    if rt.pp == 1:
        module = DLMTransformer(
            cfg.model, config, vocab_size=vocab_size, excluded_token_ids=(mask_token_id,)
        )
        if auxiliary is not None:
            auxiliary.attach(module)  # a loss may add or check weights before init
        named = list(module.named_parameters())
    else:
        loss = PipelineLoss(objective)
        module = build_pipeline_module(
            cfg.model,
            config,
            vocab_size=vocab_size,
            padded_vocab=padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by),
            mask_token_id=mask_token_id,
            topology=rt.topology.deepspeed_topology(),
            loss=loss,
        )
        named = [
            (canonical_pipe_name(n, cfg.model.num_layers), p) for n, p in module.named_parameters()
        ]
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
    ds, *_ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, rt),
        # DeepSpeed derives a pipeline engine's groups from the PipelineModule's topology and
        # refuses an mpu next to it; the plain engine takes Megatron's groups through the mpu.
        mpu=MegatronMPU() if rt.pp == 1 else None,
    )
    if isinstance(optimizer, MasterWeightAdamW):
        ds.enable_backward_allreduce = False  # the optimizer all-reduces its fp32 gradients
    kernels = attention_kernels(cfg, rt)
    if rt.pp == 1:
        # Under sequence parallelism each TP rank holds a slice of the sequence, which the
        # output layer all-gathers itself: there the head runs on every position.
        sparse = cfg.model.sparse_output and not cfg.parallel.sequence_parallel
        engine = DataParallelEngine(ds, objective, rt, kernels=kernels, sparse_output=sparse)
        engine.auxiliary = auxiliary
        return engine
    return PipelineParallelEngine(ds, objective, rt, loss, cfg.model.num_layers, kernels=kernels)
