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

Expert parallelism: routed-expert parameters (`param.expert_parallel`) are held by the ranks
of one expert-data-parallel group only (`expert_dp_group`: the data-parallel ranks with the same
experts), so they get their own flat buffer, reduced (and sharded) over that group; like every
gradient it is divided by the full data-parallel size, since each rank's loss is the mean over
its own tokens. The gradient norm counts every expert once.

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


class _Flat:
    """The parameters reduced over one group: one flat fp32 gradient buffer (one collective),
    and with sharding the flat parameters and this rank's slice [lo, hi) of both."""

    def __init__(self, params: list[torch.Tensor], group, shard: bool):
        self.params, self.group = params, group
        size = _size(group)
        self.shard = shard and size > 1
        device = params[0].device
        total = sum(p.numel() for p in params)
        padded = -(-total // size) * size if self.shard else total
        chunk = padded // size if self.shard else total
        lo = _rank(group) * chunk if self.shard else 0
        self.owned = (lo, lo + chunk)
        self.grad = torch.zeros(padded, dtype=torch.float32, device=device)
        self.param = None
        if self.shard:  # parameters become views of one buffer: one all-gather refreshes all
            self.param = torch.zeros(padded, dtype=params[0].dtype, device=device)

    def reduce(self, dp: int) -> None:
        """Sum over the group, divided by the data-parallel size `dp` (the gradient of the mean
        of all replicas' losses)."""
        if dp > 1:
            self.grad.div_(dp)
        if _size(self.group) == 1:
            return
        if not self.shard:
            dist.all_reduce(self.grad, group=self.group)
        elif self.grad.is_cuda:
            lo, hi = self.owned
            dist.reduce_scatter_tensor(self.grad[lo:hi], self.grad, group=self.group)
        else:  # gloo has no reduce-scatter: all-reduce, then this rank reads its slice only
            dist.all_reduce(self.grad, group=self.group)

    def gather(self) -> None:
        lo, hi = self.owned
        if self.param.is_cuda:
            dist.all_gather_into_tensor(self.param, self.param[lo:hi], group=self.group)
        else:  # gloo: the list form, into views of the flat buffer
            chunks = list(self.param.chunk(_size(self.group)))
            dist.all_gather(chunks, self.param[lo:hi].clone(), group=self.group)


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
        expert_dp_group=None,
        shard: bool = False,
        skip_nonfinite: bool = False,
    ):
        """`model_parallel_group`: the ranks of one replica (TP x PP): the gradient norm sums
        over them; `tp_group` decides which ranks count a TP-replicated parameter (rank 0).
        `expert_dp_group`: the data-parallel ranks holding this rank's experts (parameters
        marked `expert_parallel`), for an MoE model; None for a dense one.
        `skip_nonfinite`: a step whose gradient norm is not finite changes nothing (decided on
        the device: the fused kernel's `found_inf`); `skipped` counts them."""
        super().__init__(param_groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.max_grad_norm = max_grad_norm
        self.dp_group, self.tp_group = dp_group, tp_group
        self.mp_group = tp_group if model_parallel_group is None else model_parallel_group
        self.dp = _size(dp_group)
        self.shard = shard and self.dp > 1
        params = [p for g in self.param_groups for p in g["params"]]
        device = params[0].device
        experts = [p for p in params if getattr(p, "expert_parallel", False)]
        dense = [p for p in params if not getattr(p, "expert_parallel", False)]
        self.flats = [_Flat(dense, dp_group, self.shard)] if dense else []
        self.expert_dp_group = expert_dp_group
        if experts:
            group = dp_group if expert_dp_group is None else expert_dp_group
            self.flats.append(_Flat(experts, group, self.shard))
        first = _rank(tp_group) == 0
        for flat in self.flats:
            self._lay_out(flat, first)
        self._global_grad_norm: torch.Tensor | None = None
        self.skip_nonfinite = skip_nonfinite
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        # Parameters whose fp32 gradient holds nothing of this step yet: their first gradient
        # is copied in, which spares zeroing the whole buffer (a 6 GB memset at 1.5B parameters)
        # and reading it back in the first add.
        self._unwritten: set[torch.Tensor] = set(params)

    def _lay_out(self, flat: _Flat, first_tp_rank: bool) -> None:
        """Each parameter's views into its flat buffers, and the state of the slice it owns."""
        lo, hi = flat.owned
        offset = 0
        for p in flat.params:
            n = p.numel()
            if flat.param is not None:
                flat.param[offset : offset + n].copy_(p.detach().reshape(-1))
                p.data = flat.param[offset : offset + n].view_as(p)
            start, end = max(offset, lo), min(offset + n, hi)
            segment = (start - offset, end - offset) if start < end else None
            owned = 0 if segment is None else end - start
            flat_p = p.detach().reshape(-1)
            device = p.device
            self.state[p] = {
                "grad": flat.grad[offset : offset + n].view_as(p),
                "segment": segment,
                "master": flat_p[segment[0] : segment[1]].float().clone() if segment else None,
                "exp_avg": torch.zeros(owned, dtype=torch.float32, device=device),
                "exp_avg_sq": torch.zeros(owned, dtype=torch.float32, device=device),
                "step": torch.zeros((), dtype=torch.float32, device=device),
                # TP-sharded parameters count in the norm on every TP rank, replicated ones once
                "counted": bool(getattr(p, "tensor_model_parallel", False)) or first_tp_rank,
                "flat": flat,
            }
            offset += n
            p.register_post_accumulate_grad_hook(self._accumulate)

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
        for flat in self.flats:
            flat.reduce(self.dp)

    def _sumsq(self, flat: _Flat) -> torch.Tensor:
        """Sum of squares of the counted gradient elements this rank owns in `flat`."""
        pieces = [
            owned[0] for p in flat.params
            if self.state[p]["counted"] and (owned := self._owned(p)) is not None
        ]  # fmt: skip
        if not pieces:
            return torch.zeros((), device=flat.grad.device)
        return torch.stack(torch._foreach_norm(pieces)).square().sum()

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (averaged) gradient over the whole model, each element once."""
        sums = [self._sumsq(flat) for flat in self.flats]
        if self.expert_dp_group is not None and len(self.flats) == 1:
            sums.append(torch.zeros_like(sums[0]))  # a pipeline stage without experts
        sums = torch.stack(sums)  # [dense, experts]: the same shape on every rank
        if self.shard:  # every element is owned by one rank of its group: sum over all ranks
            if dist.is_initialized():
                dist.all_reduce(sums)
            return sums.sum().sqrt()
        if self.expert_dp_group is None:  # dense: every DP rank holds its replica's sum
            if _size(self.mp_group) > 1:
                dist.all_reduce(sums, group=self.mp_group)
            return sums.sum().sqrt()
        # with experts: a world sum counts each element once per replica of its buffer
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            copies = [self.dp, _size(self.expert_dp_group)]
            sums = sums / torch.tensor(copies, device=sums.device, dtype=sums.dtype)
        return sums.sum().sqrt()

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
        for flat in self.flats:
            if flat.shard:
                flat.gather()
        self._forget_gradients()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        self._forget_gradients()

    def _forget_gradients(self) -> None:
        self._unwritten = {p for g in self.param_groups for p in g["params"]}

    # ------------------------------------------------------------------ checkpoints
    def full_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """fp32 {param, exp_avg, exp_avg_sq} of parameter p, whole; collective over its group
        (DP, or expert DP) when sharded: every rank of it calls it for the same parameters in
        the same order."""
        state = self.state[p]
        out = {}
        for kind, key in _KINDS:
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            if state["segment"] is not None:
                a, b = state["segment"]
                full[a:b] = state[key]
            if state["flat"].shard:  # each element is owned once in the group
                dist.all_reduce(full, group=state["flat"].group)
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
