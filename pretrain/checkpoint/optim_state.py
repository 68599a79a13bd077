"""Per-parameter optimizer state through DeepSpeed, whatever the ZeRO stage and precision.

For each local (tensor-parallel) parameter shard we read and write three fp32 tensors, complete
over the data-parallel group: the master weight and AdamW's two moments. That is the whole
optimizer state apart from the step count, and it does not depend on how ZeRO partitions it,
which is what makes a checkpoint loadable at another data-parallel size.

    ZeRO 1/2, bf16 (any stage)  DeepSpeed's fragment API (`safe_get/set_full_*`), collective over DP
    ZeRO 3                      the same for reading; writing goes through `_z3_set` (below)
    ZeRO 0, fp32                the parameter itself and the torch optimizer's per-param state
    optim.master_weights=fused  the optimizer's own `full_state` / `load_state` (collective over
                                DP when it shards its state, ZeRO-1)

Verified bit-exact: capture after N steps, restore into a fresh engine, and the next steps' losses
equal an uninterrupted run for ZeRO 0-3 (tests/test_parallel.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

KINDS = ("param", "exp_avg", "exp_avg_sq")
"""What is stored per parameter: fp32 master weight, AdamW first and second moment."""


def inner_optimizer(ds) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's wrappers (ZeRO / bf16 optimizers keep it as .optimizer)."""
    opt = ds.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _managed(param) -> bool:
    """True when DeepSpeed keeps a separate fp32 copy (ZeRO >= 1 or bf16)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def get_param_state(ds, param) -> dict[str, torch.Tensor]:
    """fp32 {param, exp_avg, exp_avg_sq} of one local parameter. Collective over the DP group
    for DeepSpeed-managed parameters: every DP rank must call it for the same parameters in the
    same order."""
    opt = inner_optimizer(ds)
    if hasattr(opt, "full_state"):  # our MasterWeightAdamW, sharded or not
        return opt.full_state(param)
    if _managed(param):
        return {
            "param": safe_get_full_fp32_param(param),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq"),
        }
    state = opt.state.get(param, {})
    zeros = torch.zeros_like(param, dtype=torch.float32)
    return {
        "param": param.detach().float(),
        "exp_avg": state.get("exp_avg", zeros).float(),
        "exp_avg_sq": state.get("exp_avg_sq", zeros).float(),
    }


def prepare_for_restore(ds) -> None:
    """Create (zero) AdamW state for every flat partition and link DeepSpeed's fragment views.

    torch creates optimizer state lazily at the first step, and DeepSpeed links its per-parameter
    views into that state at the same time; a freshly built engine has neither.
    """
    opt = inner_optimizer(ds)
    if hasattr(opt, "load_state"):  # MasterWeightAdamW: its state exists from construction
        return
    flats = getattr(ds.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is not None:  # ZeRO-3 swaps its flat partitions into param_groups only during step()
        pairs = [(p, opt.param_groups[0]) for p in flats]
    else:
        pairs = [(p, g) for g in opt.param_groups for p in g["params"]]
    for p, group in pairs:
        if "exp_avg" in opt.state.get(p, {}):
            continue
        on_device = group.get("fused") or group.get("capturable")
        opt.state[p] = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    link_fragments(ds)


def link_fragments(ds) -> None:
    """(Re)build DeepSpeed's per-parameter views into the flat optimizer state.

    ZeRO-1/2 link them once, right after the first param group's first step, so groups that
    step after it (our no-weight-decay group) are never linked and `safe_get_full_optimizer_state`
    fails for their parameters. Linking again once all groups have state fixes that.
    """
    if hasattr(ds.optimizer, "_lazy_init_hp_params_optimizer_state"):
        ds.optimizer._hp_optimizer_states_linked = False
        ds.optimizer._lazy_init_hp_params_optimizer_state()


def set_param_state(ds, param, values: dict[str, torch.Tensor]) -> None:
    """Inverse of `get_param_state` (call `prepare_for_restore` once before). Not collective."""
    opt = inner_optimizer(ds)
    if hasattr(opt, "load_state"):
        opt.load_state(param, values)
    elif hasattr(param, "ds_id"):
        for kind in KINDS:
            _z3_set(param, values[kind], None if kind == "param" else kind)
    elif _managed(param):
        safe_set_full_fp32_param(param, values["param"])
        safe_set_full_optimizer_state(param, values["exp_avg"], "exp_avg")
        safe_set_full_optimizer_state(param, values["exp_avg_sq"], "exp_avg_sq")
    else:
        state = opt.state[param]
        with torch.no_grad():
            param.copy_(values["param"])
        state["exp_avg"].copy_(values["exp_avg"])
        state["exp_avg_sq"].copy_(values["exp_avg_sq"])


def _z3_set(param, value: torch.Tensor, key: str | None) -> None:
    """Write this rank's ZeRO-3 partition of `value` into the fp32 master or an Adam moment.

    DeepSpeed's own `set_full_hp_param` slices `value` without the padding of the last
    partition and fails when the parameter size does not divide the DP size, so the padded
    slicing is done here (same private accessors DeepSpeed uses).
    """
    opt = param._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(
        param, release_swap_buffers=False, optim_state_key=key
    )
    rank = opt._get_param_partition_rank(param)
    flat = value.flatten().to(part.device, torch.float32)
    flat = F.pad(flat, (0, max(0, part.numel() * (rank + 1) - flat.numel())))
    part.data.copy_(flat.narrow(0, part.numel() * rank, part.numel()))


def get_step(ds) -> int:
    opt = inner_optimizer(ds)
    if hasattr(opt, "get_step"):
        return opt.get_step()
    steps = {int(s["step"]) for s in opt.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer param groups disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def set_step(ds, step: int) -> None:
    opt = inner_optimizer(ds)
    if hasattr(opt, "set_step"):
        return opt.set_step(step)
    for state in opt.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], float(step))


def set_lr_schedule(ds, scheduler_state: dict) -> None:
    """Restore the LR scheduler and push its current LR into the param groups (LambdaLR only
    writes them at its next step, and the next optimizer step would use a stale LR)."""
    ds.lr_scheduler.load_state_dict(scheduler_state)
    for group, lr in zip(
        inner_optimizer(ds).param_groups, ds.lr_scheduler.get_last_lr(), strict=True
    ):
        group["lr"] = lr
