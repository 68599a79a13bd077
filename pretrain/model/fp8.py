"""FP8 matmuls in the Megatron-core linears (`model.fp8`), applied to a model after it is built.

Every `ColumnParallelLinear` / `RowParallelLinear` of the model (attention QKV and output, MLP
fc1/fc2, and with `model.fp8_output_layer` the output layer, also on its sparse masked-row
path) computes

    y [M, N] = x [M, K] @ W[N, K]^T        dx = dy @ W        dW = dy^T @ x

with both operands of each of these three GEMMs cast to FP8 by torchao's float8 training
primitives (`torchao.float8`: its recipes, dynamic scaling, and `Float8TrainingTensor`, whose
matmul is `torch._scaled_mm`). Accumulation and outputs stay in the input's precision (bf16, or
fp32 on CPU). Weights, fp32 master weights and module/parameter names are untouched: only the
class of each linear changes, to a subclass whose `_forward_impl` (the hook Megatron's forward
calls for its matmul) is ours. Checkpoints and exports are the same with fp8 on or off, and a run
resumes either way.

Megatron's linears are not `nn.Linear`, so torchao's module swap does not apply. The matmul
Megatron would run (`linear_with_grad_accumulation_and_async_allreduce`) is replaced by the same
communication, built from Megatron's own region functions, around `Fp8Matmul`.

Scales under tensor parallelism. A scale is applied inside each rank's GEMM (its dequantising
epilogue), before any result crosses ranks: column-parallel output columns are local, and
row-parallel partial sums are in real units when they are all-reduced. So a per-shard amax is
mathematically valid for every operand; but it quantises differently from one device (the
scale of W_r is not the scale of W), so numerics would depend on the layout. We keep the
project's invariant that every layout computes what one process computes: wherever an amax
reduces over a dimension that is split across the TP group, it is all-reduced (MAX) over that
group first (`tp_scales="group"`), so each rank quantises its shard exactly as one device
quantises the whole tensor.

    operand (GEMM dims)    column-parallel split    row-parallel split
    x   [M, K]             -- (replicated)          K
    W^T [K, N]             N                        K
    dy  [M, N]             N                        -- (replicated)

`tensorwise` (one amax per tensor) reduces the amaxes of W^T and dy in column-parallel layers and
of x and W^T in row-parallel ones (scalars). `rowwise` (one amax per row or column) reduces only
those taken along the split dimension (vectors). Sequence parallelism gathers the column-parallel
input before the matmul and hands the row-parallel layer a gathered output gradient, so M is
never split. `tp_scales="local"` skips the reductions (valid maths, layout-dependent numerics);
the tests use it to show what the reductions buy.

Emulation: `DLM_FP8_EMULATE=1` (tests) makes the same casts and runs the GEMMs in fp32 on the
dequantised operands (torchao's `emulate`). Without it, CPUs and GPUs without FP8 tensor cores
(CUDA capability < 8.9) are refused with a `ConfigError`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.transformer_layer import TransformerLayer

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.model.layers import RowParallelLinearWithGroup

EMULATE_ENV = "DLM_FP8_EMULATE"
"""`DLM_FP8_EMULATE=1` emulates FP8 (same casts, fp32 GEMMs): for tests, no speed-up."""
ALIGN = 16
"""`torch._scaled_mm` needs the non-row dims of its operands in multiples of 16; row counts
(tokens, the sparse head's masked rows) are padded to it with zero rows (exact: a zero row
changes no amax and adds nothing to dW)."""
MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer."""

# The six casts of one linear: name -> (operand, its GEMM dims, axis of a rowwise amax).
# Forward: input @ weight. Backward: grad_output @ weight_for_grad_input^T (dx) and
# grad_output_for_grad_weight^T @ input_for_grad_weight (dW). Each name is also torchao's
# Float8LinearConfig attribute `cast_config_<name>`.
CASTS = {
    "input": ("x", "MK", -1),
    "weight": ("w", "KN", 0),
    "grad_output": ("dy", "MN", -1),
    "weight_for_grad_input": ("w", "KN", -1),
    "grad_output_for_grad_weight": ("dy", "MN", 0),
    "input_for_grad_weight": ("x", "MK", 0),
}
ROLES = {"x": "INPUT", "w": "WEIGHT", "dy": "GRAD_OUTPUT"}
"""torchao's GemmInputRole of each operand (it picks the GEMM config from the two roles)."""
TP_SPLIT = {"column": {"x": None, "w": "N", "dy": "N"}, "row": {"x": "K", "w": "K", "dy": None}}
"""The GEMM dimension along which each operand is split over the TP ranks (None: replicated)."""

RECIPES = ("tensorwise", "rowwise")
"""model.fp8 values: torchao's recipes of these names (dynamic scaling; `rowwise` scales per
row/column with power-of-2 scales and casts gradients to e4m3)."""


_TORCHAO = None


def _torchao():
    """torchao's float8 modules, imported on first use (the package runs without torchao)."""
    global _TORCHAO
    if _TORCHAO is not None:
        return _TORCHAO
    log = logging.getLogger("torchao")
    level = log.level
    # torchao warns when its C++ extensions do not load (CPU machines, torch builds its wheel was
    # not built for); float8 training does not use them: its GEMM is torch._scaled_mm.
    log.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
        from torchao.float8 import float8_training_tensor, float8_utils
    except ImportError as exc:
        raise ConfigError(
            f"model.fp8 needs torchao: pip install 'dlm-pretrain[fp8]' ({exc})"
        ) from None
    finally:
        log.setLevel(level)
    _TORCHAO = float8, float8_training_tensor, float8_utils
    return _TORCHAO


@dataclass(frozen=True)
class Cast:
    role: str
    """torchao GemmInputRole name: INPUT, WEIGHT or GRAD_OUTPUT."""
    config: object
    """torchao CastConfig (scaling granularity, FP8 dtype)."""
    axis: int | None
    """Axis a rowwise amax reduces over; None for one amax per tensor."""
    reduce_tp: bool
    """All-reduce the amax over the TP group first (it reduces over a split dimension)."""


@dataclass(frozen=True)
class Fp8Plan:
    """How one linear runs in FP8. Hashable and immutable: torch.compile takes it as a constant."""

    casts: tuple[Cast, ...]
    """One per entry of CASTS, in that order."""
    mm_config: object
    """torchao LinearMMConfig: fast accumulation in the forward GEMM, emulation."""
    round_scales_to_power_of_2: bool
    group_name: str | None
    """The TP group of the amax reductions (None: TP = 1 or `tp_scales="local"`)."""
    reuse_casts: bool
    """Tensorwise: the backward GEMMs reuse the forward's FP8 x and W (the same scales), saved
    in place of the high-precision x, and dy is cast once for both."""
    compiled: bool = False
    """Run the matmul through torch.compile (the linears outside the compiled layers)."""

    def cast(self, name: str, t: torch.Tensor):
        """High-precision t -> Float8TrainingTensor, scaled as the cast `name` says."""
        _, tensors, utils = _torchao()
        cast = self.casts[list(CASTS).index(name)]
        granularity = cast.config.scaling_granularity
        amax = utils.tensor_to_amax(t, scaling_granularity=granularity, axiswise_dim=cast.axis)
        if cast.reduce_tp and self.group_name is not None:
            amax = _all_reduce_max(amax, self.group_name)
        dtype = cast.config.target_dtype
        scale = utils.amax_to_scale(amax, dtype, self.round_scales_to_power_of_2)
        role = getattr(tensors.GemmInputRole, cast.role)
        return tensors.hp_tensor_and_scale_to_float8(
            t, scale, dtype, self.mm_config, role, cast.axis
        )


def _all_reduce_max(amax: torch.Tensor, group_name: str) -> torch.Tensor:
    # functional collectives: traceable by torch.compile, a group given by its name
    from torch.distributed import _functional_collectives as funcol

    amax = funcol.all_reduce(amax, "max", group_name)
    return amax.wait() if isinstance(amax, funcol.AsyncCollectiveTensor) else amax


@torch._dynamo.allow_in_graph
class Fp8Matmul(torch.autograd.Function):
    """x [M, K], w [N, K] -> x @ w^T [M, N], the three GEMMs in FP8 as `plan` says.

    dW is computed here from dy and x (not through the casts), so W's gradient reaches the
    parameter in the precision autograd expects."""

    @staticmethod
    def forward(ctx, x, w, plan: Fp8Plan):
        x8 = plan.cast("input", x)
        w8 = plan.cast("weight", w.t())  # [K, N]
        ctx.plan = plan
        ctx.save_for_backward(*((x8, w8) if plan.reuse_casts else (x, w)))
        return torch.mm(x8, w8)

    @staticmethod
    def backward(ctx, dy):
        plan = ctx.plan
        a, b = ctx.saved_tensors
        if plan.reuse_casts:
            x8, w8 = a, b
            dy8 = plan.cast("grad_output", dy)
            dx = torch.mm(dy8, w8.t())
            dw = torch.mm(dy8.t(), x8)
        else:
            x, w = a, b
            dx = torch.mm(
                plan.cast("grad_output", dy), plan.cast("weight_for_grad_input", w.t()).t()
            )
            dw = torch.mm(
                plan.cast("grad_output_for_grad_weight", dy).t(),
                plan.cast("input_for_grad_weight", x),
            )
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, plan: Fp8Plan) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T -> [..., N] with FP8 operands, in x's precision."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)  # [M, K]
    count = rows.shape[0]
    if count == 0:  # an expert no token was routed to: no amax to take, nothing to multiply
        # (every TP rank of an expert has the same tokens, so none of them waits for the
        # others' amax reduction)
        return x @ weight.t()
    # Padded even when `pad` is 0: a branch on it would be a guard on the row count, and the
    # sparse head's count changes every step (a recompilation each time the guard flips).
    rows = F.pad(rows, (0, 0, 0, -count % ALIGN))
    out = Fp8Matmul.apply(rows, weight, plan)[:count]
    return out.reshape(*lead, out.shape[-1])


_compiled_fp8_linear = None


def _compiled(x, weight, plan):
    """fp8_linear under torch.compile (dynamic rows: the sparse head's count changes)."""
    global _compiled_fp8_linear
    if _compiled_fp8_linear is None:
        _compiled_fp8_linear = torch.compile(fp8_linear, dynamic=True)
    return _compiled_fp8_linear(x, weight, plan)


class Fp8LinearMixin:
    """Megatron's column/row-parallel linear with the FP8 matmul (`fp8_plan`) in its
    `_forward_impl`: the communication Megatron's matmul function does, then `fp8_linear`."""

    fp8_plan: Fp8Plan

    def _forward_impl(
        self,
        input,
        weight,
        bias=None,
        gradient_accumulation_fusion=False,
        allreduce_dgrad=False,
        sequence_parallel=False,
        grad_output_buffer=None,
        wgrad_deferral_limit=None,
        tp_group=None,
        **_,
    ):
        if gradient_accumulation_fusion or grad_output_buffer is not None:
            raise NotImplementedError("model.fp8 with Megatron's deferred/fused weight gradients")
        group = tp_group if tp_group is not None else self.tp_group
        if sequence_parallel:  # all-gather the sequence forward, reduce-scatter dx backward
            input = gather_from_sequence_parallel_region(input, True, group=group)
        elif allreduce_dgrad:  # identity forward, all-reduce dx backward
            input = copy_to_tensor_model_parallel_region(input, group=group)
        device = input.device.type
        if torch.is_autocast_enabled(device):  # bf16-autocast: FP8 from the compute dtype
            input = input.to(torch.get_autocast_dtype(device))
        run = _compiled if self.fp8_plan.compiled else fp8_linear
        out = run(input, weight, self.fp8_plan)
        return out if bias is None else out + bias


class Fp8ColumnParallelLinear(Fp8LinearMixin, ColumnParallelLinear):
    pass


class Fp8RowParallelLinear(Fp8LinearMixin, RowParallelLinear):
    pass


class Fp8RowParallelLinearWithGroup(Fp8LinearMixin, RowParallelLinearWithGroup):
    pass


FP8_CLASSES = {
    ColumnParallelLinear: (Fp8ColumnParallelLinear, "column"),
    RowParallelLinear: (Fp8RowParallelLinear, "row"),
    RowParallelLinearWithGroup: (Fp8RowParallelLinearWithGroup, "row"),
}
"""Megatron linear class -> (its FP8 subclass, TP kind). Exact types: a subclass we do not know
could have its own `_forward_impl`."""


def emulation_requested() -> bool:
    return os.environ.get(EMULATE_ENV, "") == "1"


def check_fp8_hardware(recipe: str, device: torch.device) -> None:
    """ConfigError unless `device` has FP8 tensor cores."""
    hint = f"set model.fp8=off ({EMULATE_ENV}=1 emulates FP8 in fp32, for tests)"
    if device.type != "cuda":
        raise ConfigError(
            f"model.fp8 '{recipe}' needs a GPU with FP8 tensor cores; this run is on "
            f"{device.type}: {hint}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(
            f"model.fp8 '{recipe}' needs FP8 tensor cores (CUDA compute capability >= "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: Ada, Hopper or newer); {device} "
            f"({torch.cuda.get_device_name(device)}) has {capability[0]}.{capability[1]}: {hint}"
        )


def make_plan(recipe: str, kind: str, *, group_name, emulate: bool, compiled: bool) -> Fp8Plan:
    """The FP8 plan of one linear of TP `kind` ('column'/'row'); group_name None: no TP
    reductions."""
    float8, tensors, _ = _torchao()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    casts = []
    for name, (operand, dims, axis) in CASTS.items():
        cc = getattr(config, f"cast_config_{name}")
        axiswise = cc.scaling_granularity is float8.ScalingGranularity.AXISWISE
        reduced = dims[axis] if axiswise else dims  # the dims this amax reduces over
        split = TP_SPLIT[kind][operand]
        reduce_tp = split is not None and split in reduced
        casts.append(Cast(ROLES[operand], cc, axis if axiswise else None, reduce_tp))
    gemms = (
        config.gemm_config_output,
        config.gemm_config_grad_input,
        config.gemm_config_grad_weight,
    )
    mm_config = tensors.LinearMMConfig(
        *(tensors.ScaledMMConfig(emulate, g.use_fast_accum, False, False) for g in gemms)
    )
    tensorwise = all(c.axis is None for c in casts)
    pairs = (
        ("input", "input_for_grad_weight"),
        ("weight", "weight_for_grad_input"),
        ("grad_output", "grad_output_for_grad_weight"),
    )
    same = all(  # one cast per operand serves both of its GEMMs
        getattr(config, f"cast_config_{a}") == getattr(config, f"cast_config_{b}") for a, b in pairs
    )
    return Fp8Plan(
        casts=tuple(casts),
        mm_config=mm_config,
        round_scales_to_power_of_2=config.round_scales_to_power_of_2,
        group_name=group_name,
        reuse_casts=tensorwise and same,
        compiled=compiled,
    )


def apply_fp8(
    module: torch.nn.Module,
    model: ModelConfig,
    *,
    device: torch.device,
    emulate: bool | None = None,
    tp_scales: str = "group",
) -> list[str]:
    """Switch every Megatron linear in `module` to FP8 matmuls as `model.fp8` says; returns the
    names of the converted linears ([] and no torchao import for `off`, i.e. False).

    Call it after the model is built and moved to its device, before torch.compile.
    `emulate` None reads DLM_FP8_EMULATE. `tp_scales`: `group` (amaxes all-reduced over the TP
    group where they span a split dimension) or `local` (per-shard amaxes)."""
    recipe = model.fp8
    if not recipe:
        return []
    if recipe not in RECIPES:
        raise ConfigError(f"model.fp8 must be off, {' or '.join(RECIPES)}; got {recipe!r}")
    if tp_scales not in ("group", "local"):
        raise ValueError(f"tp_scales must be 'group' or 'local', got {tp_scales!r}")
    emulate = emulation_requested() if emulate is None else emulate
    if not emulate:
        check_fp8_hardware(recipe, device)
    in_layers = {
        id(m)
        for layer in module.modules()
        if isinstance(layer, TransformerLayer)
        for m in layer.modules()
    }
    plans: dict[tuple, Fp8Plan] = {}
    converted = []
    for name, linear in module.named_modules():
        if type(linear) not in FP8_CLASSES:
            if isinstance(linear, ColumnParallelLinear | RowParallelLinear) and not isinstance(
                linear, Fp8LinearMixin
            ):
                raise ConfigError(f"model.fp8: no FP8 version of {type(linear).__name__} ({name})")
            continue
        if id(linear) not in in_layers and not model.fp8_output_layer:
            continue  # the output layer stays in bf16
        cls, kind = FP8_CLASSES[type(linear)]
        if not emulate and any(d % ALIGN for d in linear.weight.shape):
            raise ConfigError(
                f"model.fp8: {name} has a weight shard of shape {tuple(linear.weight.shape)}; "
                f"FP8 GEMMs need both dims in multiples of {ALIGN}"
            )
        tp = linear.tp_group.size() if linear.tp_group is not None else 1
        group = linear.tp_group.group_name if tp > 1 and tp_scales == "group" else None
        # the layers compile themselves, and so does the head's chunk with `compile_head`
        head_compiled = model.compile_head and tp == 1
        compiled = model.compile and id(linear) not in in_layers and not head_compiled
        key = (kind, group, compiled)
        if key not in plans:
            plans[key] = make_plan(
                recipe, kind, group_name=group, emulate=emulate, compiled=compiled
            )
        linear.__class__ = cls
        linear.fp8_plan = plans[key]
        converted.append(name)
    return converted
