"""AdamW on fp32 master weights of bf16 parameters, in a handful of multi-tensor kernels,
optionally sharded over the data-parallel ranks (a distributed optimizer, ZeRO-1).

    during backward   g32_i  = g16_i          (the first gradient of p_i in a step: a copy)
                      g32_i += g16_i          (later micro-batches: fp32 accumulation)
                                              then g16_i is freed
    at the step       g32_i  = 0              (only for parameters that got no gradient)
                      g32 <- mean over data-parallel replicas (one all-reduce of the flat buffer;
                             sharded: a reduce-scatter, each rank keeps its 1/dp slice)
                      c = min(1, max_norm / ||g32||)               (computed on the device)
                      AdamW(p32, c * g32, m, v)    (one fused kernel, on this rank's slice)
                      p16 <- bf16(p32)             (sharded: then all-gather the flat params)

`optim.master_weights=fused` uses it in place of DeepSpeed's bf16/ZeRO optimizer: the same
maths, without per-parameter Python bookkeeping or host synchronisation in the step (the clip
factor stays on the device, the norm is read only when logged). DeepSpeed then runs in plain
mode around it and must not all-reduce gradients itself (`build_engine` switches that off, for
the data-parallel and the pipeline engine alike).

Sharding (`shard=True`, with `parallel.zero_stage=1`): the parameters of this rank (its TP
shards and pipeline stage) are laid out in one flat buffer, split into dp equal slices; rank r
keeps the fp32 master weights and both moments of slice r only (12 bytes per parameter / dp),
and the full fp32 gradient buffer. The parameters themselves become views into a flat buffer so
that one all-gather refreshes all of them. Checkpoints read and write whole per-parameter
tensors (`full_state`, collective over DP; `load_state`), so they do not depend on dp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# checkpoint kinds -> state keys
_KINDS = (("param", "master"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"))


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


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
        model_parallel_group=None,
        shard: bool = False,
        skip_nonfinite: bool = False,
    ):
        """`model_parallel_group`: the ranks of one replica (TP x PP): the gradient norm sums
        over them; `tp_group` decides which ranks count a TP-replicated parameter (rank 0).
        `skip_nonfinite`: a step whose gradient norm is not finite changes nothing (decided on
        the device: the fused kernel's `found_inf`); `skipped` counts them."""
        super().__init__(param_groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.max_grad_norm = max_grad_norm
        self.dp_group, self.tp_group = dp_group, tp_group
        self.mp_group = tp_group if model_parallel_group is None else model_parallel_group
        dp = _size(dp_group)
        self.shard = shard and dp > 1
        params = [p for g in self.param_groups for p in g["params"]]
        device = params[0].device
        total = sum(p.numel() for p in params)
        padded = -(-total // dp) * dp if self.shard else total
        chunk = padded // dp if self.shard else total
        lo = _rank(dp_group) * chunk if self.shard else 0
        self.owned = (lo, lo + chunk)
        # One flat fp32 buffer for all gradients: a single collective over data-parallel ranks.
        self.flat_grad = torch.zeros(padded, dtype=torch.float32, device=device)
        self.flat_param = None
        if self.shard:  # parameters become views of one buffer: one all-gather refreshes all
            self.flat_param = torch.zeros(padded, dtype=params[0].dtype, device=device)
        offset = 0
        first = _rank(tp_group) == 0
        for p in params:
            n = p.numel()
            if self.flat_param is not None:
                self.flat_param[offset : offset + n].copy_(p.detach().reshape(-1))
                p.data = self.flat_param[offset : offset + n].view_as(p)
            start, end = max(offset, lo), min(offset + n, lo + chunk)
            segment = (start - offset, end - offset) if start < end else None
            owned = 0 if segment is None else end - start
            flat_p = p.detach().reshape(-1)
            self.state[p] = {
                "grad": self.flat_grad[offset : offset + n].view_as(p),
                "segment": segment,
                "master": flat_p[segment[0] : segment[1]].float().clone() if segment else None,
                "exp_avg": torch.zeros(owned, dtype=torch.float32, device=device),
                "exp_avg_sq": torch.zeros(owned, dtype=torch.float32, device=device),
                "step": torch.zeros((), dtype=torch.float32, device=device),
                # TP-sharded parameters count in the norm on every TP rank, replicated ones once
                "counted": bool(getattr(p, "tensor_model_parallel", False)) or first,
            }
            offset += n
            p.register_post_accumulate_grad_hook(self._accumulate)
        self._global_grad_norm: torch.Tensor | None = None
        self.skip_nonfinite = skip_nonfinite
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)
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

    def _owned(self, p) -> tuple[torch.Tensor, ...] | None:
        """This rank's slice of p: (flat grad, flat param) views, or None if it owns none."""
        state = self.state[p]
        if state["segment"] is None:
            return None
        a, b = state["segment"]
        return state["grad"].reshape(-1)[a:b], p.detach().reshape(-1)[a:b]

    def _reduce_gradients(self) -> None:
        dp = _size(self.dp_group)
        if dp == 1:
            return
        self.flat_grad.div_(dp)
        if not self.shard:
            dist.all_reduce(self.flat_grad, group=self.dp_group)
        elif self.flat_grad.is_cuda:
            lo, hi = self.owned
            dist.reduce_scatter_tensor(self.flat_grad[lo:hi], self.flat_grad, group=self.dp_group)
        else:  # gloo has no reduce-scatter: all-reduce, then this rank reads its slice only
            dist.all_reduce(self.flat_grad, group=self.dp_group)

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (averaged) gradient over the whole model."""
        pieces = [
            owned[0] for g in self.param_groups for p in g["params"]
            if self.state[p]["counted"] and (owned := self._owned(p)) is not None
        ]  # fmt: skip
        if pieces:
            sumsq = torch.stack(torch._foreach_norm(pieces)).square().sum()
        else:
            sumsq = torch.zeros((), device=self.flat_grad.device)
        # sharded: every element lives on one DP rank, so sum over all ranks; else over the
        # replica's model-parallel ranks (every DP rank holds the same sum)
        group = None if self.shard else self.mp_group
        if (dist.is_initialized() and self.shard) or _size(group) > 1:
            dist.all_reduce(sumsq, group=group)
        return sumsq.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        for p in self._unwritten:  # no gradient this step (unused parameters): zero, not stale
            self.state[p]["grad"].zero_()
        self._reduce_gradients()
        norm = self._grad_norm()
        self._global_grad_norm = norm
        clip = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0) if self.max_grad_norm else None
        found_inf = None
        if self.skip_nonfinite:  # 1.0 when this step must change nothing, on the device
            found_inf = (~torch.isfinite(norm)).float()
            self.skipped += found_inf
        for group in self.param_groups:
            mine = [p for p in group["params"] if self.state[p]["segment"] is not None]
            if not mine:
                continue
            states = [self.state[p] for p in mine]
            grads = [self._owned(p)[0] for p in mine]
            if clip is not None:
                torch._foreach_mul_(grads, clip)
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0 if found_inf is None else [1.0 - found_inf] * len(steps))
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
                found_inf=found_inf,
            )
            torch._foreach_copy_([self._owned(p)[1] for p in mine], [s["master"] for s in states])
        if self.shard:
            self._gather_parameters()
        self._forget_gradients()

    def _gather_parameters(self) -> None:
        lo, hi = self.owned
        if self.flat_param.is_cuda:
            dist.all_gather_into_tensor(
                self.flat_param, self.flat_param[lo:hi], group=self.dp_group
            )
        else:  # gloo: the list form, into views of the flat buffer
            chunks = list(self.flat_param.chunk(_size(self.dp_group)))
            dist.all_gather(chunks, self.flat_param[lo:hi].clone(), group=self.dp_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        self._forget_gradients()

    def _forget_gradients(self) -> None:
        self._unwritten = {p for g in self.param_groups for p in g["params"]}

    # ------------------------------------------------------------------ checkpoints
    def full_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """fp32 {param, exp_avg, exp_avg_sq} of parameter p, whole; collective over DP when
        sharded (every DP rank calls it for the same parameters in the same order)."""
        state = self.state[p]
        out = {}
        for kind, key in _KINDS:
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            if state["segment"] is not None:
                a, b = state["segment"]
                full[a:b] = state[key]
            if self.shard:
                dist.all_reduce(full, group=self.dp_group)  # each element is owned once
            out[kind] = full.view_as(p)
        return out

    def load_state(self, p: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Inverse of `full_state` (not collective: each rank takes its slice)."""
        state = self.state[p]
        with torch.no_grad():
            p.copy_(values["param"])
            if state["segment"] is not None:
                a, b = state["segment"]
                for kind, key in _KINDS:
                    state[key].copy_(values[kind].reshape(-1)[a:b])

    def get_step(self) -> int:
        steps = {int(s["step"]) for s in self.state.values() if s["segment"] is not None}
        if len(steps) > 1:
            raise RuntimeError(f"optimizer slices disagree on the step count: {sorted(steps)}")
        return steps.pop() if steps else 0

    def set_step(self, step: int) -> None:
        for state in self.state.values():
            state["step"].fill_(float(step))
