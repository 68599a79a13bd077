"""AdamW on fp32 master weights of bf16 parameters, in a handful of multi-tensor kernels.

    during backward   g32_i  = g16_i          (the first gradient of p_i in a step: a copy)
                      g32_i += g16_i          (later micro-batches: fp32 accumulation)
                                              then g16_i is freed
    at the step       g32_i  = 0              (only for parameters that got no gradient)
                      g32 <- mean over data-parallel replicas      (one all-reduce, flat buffer)
                      c = min(1, max_norm / ||g32||)               (computed on the device)
                      AdamW(p32, c * g32, m, v)                    (one fused kernel)
                      p16 <- bf16(p32)

It replaces DeepSpeed's bf16 optimizer for single-stage ZeRO-0 runs (`optim.master_weights=fused`):
the same maths, without per-parameter Python bookkeeping or host synchronisation in the step (the
clip factor stays on the device, the norm is read only when logged). DeepSpeed then runs in
plain mode around it and must not all-reduce gradients itself (the engine's backward all-reduce
is switched off by `build_engine`).

The per-parameter state `{master, exp_avg, exp_avg_sq, step}` lives in `self.state[param]` like
torch's AdamW, with `master` added, so checkpoints read and write it per parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class MasterWeightAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        param_groups: list[dict],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        max_grad_norm: float,
        dp_group=None,
        tp_group=None,
    ):
        super().__init__(param_groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.max_grad_norm = max_grad_norm
        self.dp_group = dp_group
        self.tp_group = tp_group
        params = [p for g in self.param_groups for p in g["params"]]
        device = params[0].device
        total = sum(p.numel() for p in params)
        # One flat fp32 buffer for all gradients: a single all-reduce over data-parallel ranks.
        self.flat_grad = torch.zeros(total, dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            self.state[p] = {
                "master": p.detach().float().clone(),
                "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32),
                "step": torch.zeros((), dtype=torch.float32, device=device),
                "grad": grad,
            }
            p.register_post_accumulate_grad_hook(self._accumulate)
        self._global_grad_norm: torch.Tensor | None = None
        # Parameters whose fp32 gradient holds nothing of this step yet: their first gradient
        # is copied in, which spares zeroing the whole buffer (a 6 GB memset at 1.5B parameters)
        # and reading it back in the first add.
        self._unwritten: set[torch.Tensor] = set(params)

    def _accumulate(self, p: torch.Tensor) -> None:
        if p in self._unwritten:
            self.state[p]["grad"].copy_(p.grad)
            self._unwritten.discard(p)
        else:
            self.state[p]["grad"].add_(p.grad)
        p.grad = None

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm: TP-sharded parameters count on every TP rank, replicated ones once."""
        counted = [
            self.state[p]["grad"]
            for g in self.param_groups
            for p in g["params"]
            if getattr(p, "tensor_model_parallel", False) or _first_in(self.tp_group)
        ]
        sumsq = torch.stack(torch._foreach_norm(counted)).square().sum()
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(sumsq, group=self.tp_group)
        return sumsq.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        for p in self._unwritten:  # no gradient this step (unused parameters): zero, not stale
            self.state[p]["grad"].zero_()
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            self.flat_grad.div_(dist.get_world_size(self.dp_group))
            dist.all_reduce(self.flat_grad, group=self.dp_group)
        norm = self._grad_norm()
        self._global_grad_norm = norm
        clip = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0) if self.max_grad_norm else None
        for group in self.param_groups:
            states = [self.state[p] for p in group["params"]]
            if not states:
                continue
            grads = [s["grad"] for s in states]
            if clip is not None:
                torch._foreach_mul_(grads, clip)
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                [s["master"] for s in states],
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )
            torch._foreach_copy_(group["params"], [s["master"] for s in states])
        self._forget_gradients()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        self._forget_gradients()

    def _forget_gradients(self) -> None:
        self._unwritten = {p for g in self.param_groups for p in g["params"]}


def _first_in(group) -> bool:
    return group is None or dist.get_rank(group) == 0
