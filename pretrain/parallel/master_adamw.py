"""AdamW on fp32 master weights of bf16 parameters, in one fused pass over flat buffers,
optionally sharded over the data-parallel ranks (a distributed optimizer, ZeRO-1).

    during backward   g32_i  = g16_i          (the first gradient of p_i in a step: a copy)
                      g32_i += g16_i          (later micro-batches: fp32 accumulation)
                                              then g16_i is freed
    at the step       g32_i  = 0              (only for parameters that got no gradient)
                      g32 <- mean over data-parallel replicas (one all-reduce of the flat buffer;
                             sharded: a reduce-scatter, each rank keeps its 1/dp slice)
                      c = min(1, max_norm / ||g32||)               (computed on the device)
                      AdamW(p32, c * g32, m, v); p16 <- bf16(p32)
                                                   (one pass on this rank's slice; sharded:
                                                   then all-gather the flat params)

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

Flat buffers. The parameters of this rank (its TP shards and pipeline stage) become views of
one flat buffer, each starting on a 128-byte boundary (`ALIGN`: the GEMMs' operands stay
aligned); the fp32 gradients, master weights and moments are flat buffers of the same layout.
The step is then one elementwise pass per parameter group (`adamw_update_`), compiled on GPUs
by torch.compile into a single kernel that reads the gradient, master weight and both moments
once and writes the master, the moments and the bf16 weight: 30 bytes per parameter, where
torch's fused AdamW plus the clip and the bf16 copy move 42 (the clip a pass of its own, the
copy re-reading the master). No library has that kernel (torch's `_fused_adamw_` updates the
fp32 tensors only; apex's and Transformer Engine's master-weight Adam are not installable on
every machine we run on), and torch.compile writes it from the same few lines of PyTorch that
run eagerly on CPUs.

Sharding (`shard=True`, with `parallel.zero_stage=1`): the flat layout is split into dp equal
slices; rank r keeps the fp32 master weights and both moments of slice r only (12 bytes per
parameter / dp), and the full fp32 gradient buffer; one all-gather of the flat parameters
refreshes every parameter. Checkpoints read and write whole per-parameter
tensors (`full_state`, collective over DP; `load_state`), so they do not depend on dp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# checkpoint kinds -> state keys
_KINDS = (("param", "master"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"))
ALIGN = 64
"""Each parameter's offset in the flat buffers is a multiple of this many elements (128 bytes
in bf16); the holes between parameters hold zeros, which the step leaves at zero."""

MAX_RUN = 2**30
"""The longest slice one update or norm kernel takes (elements)."""


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def adamw_update_(
    param: torch.Tensor,
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: torch.Tensor,
    lr: torch.Tensor,
    clip: torch.Tensor | None,
    skip: torch.Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step (torch's formula, decoupled weight decay) on flat tensors [n]: the fp32
    `master`, `grad` and moments, and `param` (the model's weights, any float dtype) set to the
    new master weights. 0-d device tensors: `step` (already counted), `lr`, `clip` (the
    gradient's multiplier, None: 1) and `skip` (1.0: change nothing, for a non-finite step).
    Tensors, not floats, for the values that change between steps: torch.compile would
    specialise on a float."""
    g = grad if clip is None else grad * clip
    m = exp_avg * beta1 + g * (1 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = v.sqrt() / (1 - beta2**step).sqrt() + eps
    p = master * (1 - lr * weight_decay) - step_size * m / denom
    if skip is not None:
        keep = skip > 0
        m, v, p = (
            torch.where(keep, old, new) for old, new in ((exp_avg, m), (exp_avg_sq, v), (master, p))
        )
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    master.copy_(p)
    param.copy_(p)


_compiled_update = None


def _update_kernel(device: torch.device):
    """`adamw_update_` compiled into one kernel on GPUs (dynamic sizes: one graph for every
    group's range); eager elsewhere."""
    global _compiled_update
    if device.type != "cuda":
        return adamw_update_
    if _compiled_update is None:
        _compiled_update = torch.compile(adamw_update_, dynamic=True)
    return _compiled_update


class _Flat:
    """The parameters reduced over one group: their weights as views of one flat buffer, one
    flat fp32 gradient buffer (one collective), and this rank's slice [lo, hi) of the layout,
    whose fp32 master weights and moments it keeps (all of it unless sharded)."""

    def __init__(self, params: list[torch.Tensor], group, shard: bool):
        self.params, self.group = params, group
        size = _size(group)
        self.shard = shard and size > 1
        device = params[0].device
        self.offsets, total = [], 0
        for p in params:
            self.offsets.append(total)
            total += -(-p.numel() // ALIGN) * ALIGN
        unit = size * ALIGN if self.shard else ALIGN  # every rank's slice aligned too
        padded = -(-total // unit) * unit
        chunk = padded // size if self.shard else total
        lo = _rank(group) * chunk if self.shard else 0
        self.owned = (lo, lo + chunk)
        self.grad = torch.zeros(padded, dtype=torch.float32, device=device)
        self.param = torch.zeros(padded, dtype=params[0].dtype, device=device)
        for p, offset in zip(params, self.offsets, strict=True):
            self.param[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
        self.master = self.param[lo : lo + chunk].to(torch.float32, copy=True)
        self.exp_avg = torch.zeros(chunk, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(chunk, dtype=torch.float32, device=device)

    def runs(self, selected: list[bool]) -> list[tuple[int, int]]:
        """[a, b) in owned coordinates: this rank's part of each run of consecutive selected
        parameters (the holes between them included: zeros, which the step leaves at zero)."""
        lo, hi = self.owned
        runs: list[list[int]] = []
        previous = False
        for p, offset, chosen in zip(self.params, self.offsets, selected, strict=True):
            if chosen and previous:
                runs[-1][1] = offset + p.numel()
            elif chosen:
                runs.append([offset, offset + p.numel()])
            previous = chosen
        clipped = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in runs]
        return [  # pieces of at most MAX_RUN elements: 32-bit indexing in every kernel
            (start, min(start + MAX_RUN, b)) for a, b in clipped for start in range(a, b, MAX_RUN)
        ]

    def slices(self, a: int, b: int) -> tuple[torch.Tensor, ...]:
        """Views of [a, b) (owned coordinates): weights, master, gradient and both moments, in
        `adamw_update_`'s order."""
        lo = self.owned[0]
        return (
            self.param[lo + a : lo + b],
            self.master[a:b],
            self.grad[lo + a : lo + b],
            self.exp_avg[a:b],
            self.exp_avg_sq[a:b],
        )

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
        the device); `skipped` counts them."""
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
        # one step count for every parameter (each parameter's state names it)
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        self._lr = torch.zeros((), dtype=torch.float32, device=device)
        first = _rank(tp_group) == 0
        for flat in self.flats:
            self._lay_out(flat, first)
        # Fixed for the optimizer's life, so made once (per-step Python over every parameter
        # kept the host behind the device): the gradient slices the norm counts, one per
        # parameter (so each parameter's sum of squares is the same in every layout), and per
        # param group the ranges of the one-pass update.
        self._norm_pieces = [
            [
                self.state[p]["grad"].reshape(-1)[slice(*self.state[p]["segment"])]
                for p in flat.params
                if self.state[p]["counted"] and self.state[p]["segment"] is not None
            ]
            for flat in self.flats
        ]
        self._update_slices = [  # per group: (param, master, grad, exp_avg, exp_avg_sq) views
            [
                flat.slices(a, b)
                for flat in self.flats
                for a, b in flat.runs([p in members for p in flat.params])
            ]
            for members in (set(g["params"]) for g in self.param_groups)
        ]
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
        for p, offset in zip(flat.params, flat.offsets, strict=True):
            n = p.numel()
            p.data = flat.param[offset : offset + n].view_as(p)
            start, end = max(offset, lo), min(offset + n, hi)
            segment = (start - offset, end - offset) if start < end else None
            mine = slice(start - lo, end - lo) if segment else slice(0, 0)
            self.state[p] = {
                "grad": flat.grad[offset : offset + n].view_as(p),
                "segment": segment,
                "master": flat.master[mine] if segment else None,
                "exp_avg": flat.exp_avg[mine],
                "exp_avg_sq": flat.exp_avg_sq[mine],
                "step": self.step_count,
                # TP-sharded parameters count in the norm on every TP rank, replicated ones once
                "counted": bool(getattr(p, "tensor_model_parallel", False)) or first_tp_rank,
                "flat": flat,
            }
            p.register_post_accumulate_grad_hook(self._accumulate)

    def _accumulate(self, p: torch.Tensor) -> None:
        if p in self._unwritten:
            self.state[p]["grad"].copy_(p.grad)
            self._unwritten.discard(p)
        else:
            self.state[p]["grad"].add_(p.grad)
        p.grad = None

    def _reduce_gradients(self) -> None:
        for flat in self.flats:
            flat.reduce(self.dp)

    def _sumsq(self, flat: _Flat, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Sum of squares of the counted gradient elements this rank owns in `flat`."""
        if not pieces:
            return torch.zeros((), device=flat.grad.device)
        return torch.stack(torch._foreach_norm(pieces)).square().sum()

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (averaged) gradient over the whole model, each element once."""
        sums = [
            self._sumsq(flat, pieces)
            for flat, pieces in zip(self.flats, self._norm_pieces, strict=True)
        ]
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
        skip = None
        if self.skip_nonfinite:  # 1.0 when this step must change nothing, on the device
            skip = (~torch.isfinite(norm)).float()
            self.skipped += skip
        self.step_count += 1.0 if skip is None else 1.0 - skip
        for group, slices in zip(self.param_groups, self._update_slices, strict=True):
            self._lr.fill_(group["lr"])  # a fill kernel: no host-to-device copy
            beta1, beta2 = group["betas"]
            for views in slices:
                _update_kernel(self.step_count.device)(
                    *views,
                    step=self.step_count,
                    lr=self._lr,
                    clip=clip,
                    skip=skip,
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
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
        return int(self.step_count)

    def set_step(self, step: int) -> None:
        self.step_count.fill_(float(step))
