"""DeepSpeed engines behind one small interface the trainer uses for every layout.

    DataParallelEngine      pipeline_parallel = 1: DeepSpeedEngine over the whole model, with
                            Megatron's groups as `mpu` (TP inside the layers, ZeRO 0-3 over DP)
    PipelineParallelEngine  pipeline_parallel > 1: DeepSpeed PipelineEngine over the model's
                            stages (`pretrain.parallel.pipeline`; 1F1B, ZeRO 0-1)

An engine knows nothing of diffusion: it takes micro-batches (anything with `model_inputs()`)
and the caller's loss function, runs the loss on the model's last hidden states inside the
forward (on the last pipeline stage), and returns the loss function's metrics, averaged over
the micro-batches, on the ranks that compute the loss, as 0-dim tensors left on the device: the
host reads them when it logs (`host_metrics`), so a step never waits for the GPU to finish and
the host queues the next one meanwhile. `infer` is the no-grad forward that sampling, probes
and auxiliary losses use, in every layout. Building an engine: `pretrain.parallel.build`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from pretrain.model.inputs import ModelInputs
from pretrain.parallel.runtime import Runtime

# The caller's loss: (hidden [s, b, h] of the micro-batch, the model's head, the micro-batch)
# -> (scalar loss, metrics as 0-dim tensors). It runs inside the model's forward (the last
# pipeline stage's), so the engine never needs to know what it computes.
LossFn = Callable[[torch.Tensor, torch.nn.Module, object], tuple[torch.Tensor, dict]]
# What a no-grad forward reads: (hidden, head) -> a tensor of a shape the caller states.
Read = Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]


class Engine:
    """What the trainer needs from an engine, whatever the layout.

    A micro-batch is any object with `model_inputs() -> ModelInputs`; the engine runs the
    model on those inputs and the caller's `LossFn` on its hidden states.
    """

    def __init__(
        self,
        ds,
        rt: Runtime,
        *,
        kernels: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.ds = ds
        self.rt = rt
        self.kernels = kernels

    @property
    def owns_metrics(self) -> bool:
        """True on the ranks whose metrics count: the last pipeline stage, TP rank 0."""
        return self.rt.pp_rank == self.rt.pp - 1 and self.rt.tp_rank == 0

    def global_metrics(
        self, local: dict[str, torch.Tensor], names: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        """Average the metrics `names` over data-parallel replicas, on every rank.

        Only the last pipeline stage computes them and TP ranks duplicate them, so one rank per
        replica contributes to a sum over the world, which is then divided by the replica count.
        The sum is one all-reduce of a float64 vector on the device; nothing waits for it here.
        """
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
        """Pre-clipping global gradient norm of the last step (ZeRO stages >= 1 and the fused
        optimizer report it)."""
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def skipped_steps(self) -> torch.Tensor | None:
        """Steps the optimizer skipped for a non-finite gradient (`train.on_nonfinite: skip`), a
        device counter, or None when it does not skip."""
        opt = self.ds.optimizer
        while not hasattr(opt, "skip_nonfinite") and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return opt.skipped if getattr(opt, "skip_nonfinite", False) else None

    def canonical_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError

    def train_step(self, batches: list, loss_fn: LossFn) -> dict[str, torch.Tensor]:
        """One optimizer step over the micro-batches; their metrics' mean (where computed)."""
        raise NotImplementedError

    def eval_step(self, batch, loss_fn: LossFn) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def infer(self, inputs: ModelInputs, read: Read, shape: tuple[int, ...]) -> torch.Tensor:
        """A no-grad forward on `inputs`; `read(hidden, head)` of shape `shape` (fp32), on
        every rank of the replica. Collective over the whole job under pipeline parallelism:
        every rank calls it for the same inputs."""
        raise NotImplementedError


def _mean(metrics: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-name mean over micro-batches, in float64, on the metrics' device."""
    if not metrics:
        return {}
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

    def _forward(self, inputs: ModelInputs, loss_fn):
        with self.kernels():
            return self.ds(
                inputs.tokens,
                attention_mask=inputs.attention,
                position_ids=inputs.position_ids,
                loss_fn=loss_fn,
            )

    def train_step(self, batches, loss_fn):
        self.ds.train()
        collected = []
        for batch in batches:
            loss, metrics = self._forward(
                batch.model_inputs(), lambda hidden, head, b=batch: loss_fn(hidden, head, b)
            )
            self.ds.backward(loss)
            self.ds.step()  # DeepSpeed applies the update after the last micro-batch only
            collected.append(metrics)
        return _mean(collected)

    @torch.no_grad()
    def eval_step(self, batch, loss_fn):
        self.ds.eval()
        _, metrics = self._forward(
            batch.model_inputs(), lambda hidden, head: loss_fn(hidden, head, batch)
        )
        return _mean([metrics])

    @torch.no_grad()
    def infer(self, inputs, read, shape):
        return self._forward(inputs, read).float()
