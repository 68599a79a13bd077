"""Mixture-of-experts MLPs from Megatron-core's parts, with a dispatch that runs on CPU and GPU.

    hidden [s, b, h] --Router--> probs, routing_map [N, E] (N = s*b tokens, E experts)
                     --ExpertDispatcher.dispatch--> tokens grouped by local expert
                     --SequentialMLP (Megatron-core)--> weighted expert outputs
                     --ExpertDispatcher.combine--> [N, h] (+ shared experts) -> [s, b, h]

What comes from Megatron-core: the top-k router (`TopKRouter`: its gate weight, top-k scoring,
capacity dropping and the routing-score helpers of `moe_utils`), the experts (`SequentialMLP`,
one Megatron `MLP` per local expert with the expert tensor-parallel linears), the shared experts
(`SharedExpertMLP`) and the token (un)permutation helpers. What is ours, and why:

- `ExpertDispatcher`: Megatron's all-to-all dispatcher creates a CUDA stream in its constructor
  and syncs through it, and its all-to-all, all-gather and reduce-scatter mappings allocate
  their buffers with `torch.cuda.current_device()`; ours exchanges tokens between the
  expert-parallel ranks with `torch.distributed.all_to_all_single` on the tensors' own device
  (gloo and NCCL).
- `Router.gating`/`routing`: Megatron moves a CPU gate weight to CUDA, its gating linear needs
  Transformer Engine, and it allocates its expert-bias buffers on the CUDA device; and its
  load-balancing loss counts a rank's own tokens, which makes the loss depend on the
  data-parallel size. Ours counts the routed tokens of the whole data-parallel micro-batch (an
  all-reduce of E numbers), so every layout trains the same model.

The router's losses reach the training loss through the activations (`AttachLoss`, the idea
of Megatron's `MoEAuxLossAutoScaler` without its global scale): the loss term is attached to
the routing probabilities, and the backward pass gives it gradient `grad_scale` (the factor
DeepSpeed applies to the objective's loss: 1 / gradient-accumulation steps). So every pipeline
stage's router losses get their gradient with the stage's own backward, and the objective (the
recipe's loss) never has to know about them. Their values are kept for the metrics
(`pretrain.model.moe_metrics`).

Tensor parallelism: tokens are replicated over the TP ranks (under sequence parallelism the
block all-gathers the sequence first and reduce-scatters its output), every TP rank routes
them identically and holds a TP slice of every one of its experts (Megatron's
expert linears skip their own TP communication), so the expert path (tokens and routing
probabilities) enters through `copy_to_tensor_model_parallel_region` and leaves through one
`reduce_from_tensor_model_parallel_region`, as a dense MLP's linears do.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    permute,
    sort_chunks_by_idxs,
    topk_routing_with_score_function,
    unpermute,
    z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from torch.profiler import record_function
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Per-layer statistics a router accumulates between two metric reads, in this order:
# routed assignments per expert (E values), then these scalars.
STAT_SCALARS = ("forwards", "load_balancing_loss", "z_loss", "dropped", "assignments")


def keep_routing(ctx, op, *args, **kwargs):
    """Selective-checkpointing policy of an MoE layer: the routing decisions (every top-k: the
    experts of each token, capacity dropping) are saved in the forward pass and replayed when
    the layer is recomputed in backward; everything else is recomputed. A recomputed router
    need not reproduce its logits to the last bit (another kernel choice on another thread is
    enough to flip a near-tie), and a token routed differently changes the per-expert shapes
    torch.utils.checkpoint checks."""
    if op is torch.ops.aten.topk.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def routing_replay():
    """`context_fn` for torch.utils.checkpoint of a layer with an MoE MLP (`keep_routing`)."""
    return create_selective_checkpoint_contexts(keep_routing)


def _in_backward() -> bool:
    """True while autograd's engine runs (a layer recomputed for activation checkpointing)."""
    return torch._C._current_graph_task_id() != -1


class AttachLoss(torch.autograd.Function):
    """Identity on `activation`; in backward, `loss` gets gradient 1 (so d(loss)/d(params) joins
    the gradients) whenever the activation gets one. `loss` is pre-multiplied by the scale the
    objective's loss gets in backward."""

    @staticmethod
    def forward(ctx, activation: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.meta = (loss.shape, loss.dtype, loss.device)
        return activation

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.meta
        return grad, torch.ones(shape, dtype=dtype, device=device)


class Router(TopKRouter):
    """Megatron-core's top-k router: fp32 gate logits, top-k of softmax/sigmoid scores, optional
    capacity dropping and expert bias; the load-balancing and z-losses attached to the probs.

    Load-balancing loss of one micro-batch (Switch Transformer) over the N_g tokens of the whole
    data-parallel micro-batch:  L = c * E / k * sum_e f_e * P_e,  with f_e = n_e / N_g (n_e:
    tokens routed to expert e, so sum_e f_e = k) and P_e = mean router score of e. Each rank's
    term uses its own tokens' scores and the global counts n_e (no gradient through them),
    scaled so that the mean over the data-parallel ranks, which gradient averaging takes, is L.
    """

    def __init__(self, config, pg_collection, *, dp_group=None):
        # Megatron allocates the expert-bias and global-loss buffers on the current CUDA device:
        # build without them, then register the bias here on the parameters' device.
        base = copy.copy(config)
        base.moe_router_enable_expert_bias = False
        base.moe_router_load_balancing_type = "none"
        base.moe_aux_loss_coeff = 0.0
        super().__init__(config=base, pg_collection=pg_collection)
        self.dp_group = dp_group
        self.aux_coeff = config.moe_aux_loss_coeff or 0.0
        self.z_coeff = config.moe_z_loss_coeff or 0.0
        self.capacity = config.moe_expert_capacity_factor
        self.bias_rate = config.moe_router_bias_update_rate
        self.enable_expert_bias = config.moe_router_enable_expert_bias
        self.grad_scale = 1.0
        """Gradient given to the attached losses: the objective loss's backward scale."""
        del self.expert_bias, self.local_tokens_per_expert  # Megatron's None placeholders
        if self.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts))
            self.register_buffer(
                "local_tokens_per_expert", torch.zeros(self.num_experts), persistent=False
            )
        else:
            self.expert_bias = self.local_tokens_per_expert = None
        n = self.num_experts + len(STAT_SCALARS)
        self.register_buffer("stats", torch.zeros(n, dtype=torch.float64), persistent=False)

    def _maintain_float32_expert_bias(self):
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias.data = self.expert_bias.data.float()

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] -> fp32 logits [s, b, E], on the weight's own device (Megatron's
        `router_gating_linear` needs Transformer Engine in 0.16: it names TE's GEMM
        unconditionally)."""
        return torch.nn.functional.linear(input.float(), self.weight.float())

    def routing(self, logits: torch.Tensor, padding_mask=None):
        """logits [s, b, E] -> (probs [N, E] with the losses attached, routing_map [N, E])."""
        num_tokens = logits.shape[0] * logits.shape[1]
        logits = logits.reshape(num_tokens, self.num_experts)
        training = self.training and torch.is_grad_enabled()
        record = training and not _in_backward()
        z_loss = aux_loss = None
        if training and self.z_coeff:
            z_loss = z_loss_func(logits, self.z_coeff)
            logits = AttachLoss.apply(logits, z_loss * self.grad_scale)
        probs, routing_map = topk_routing_with_score_function(
            logits,
            self.topk,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
        )
        routed = routing_map
        if self.capacity is not None:
            probs, routing_map = apply_router_token_dropping(
                probs,
                routing_map,
                router_topk=self.topk,
                capacity_factor=self.capacity,
                drop_policy=self.config.moe_token_drop_policy,
            )
        if training and self.aux_coeff:
            aux_map, scores = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function
            )
            aux_loss = self._load_balancing_loss(scores, aux_map)
            probs = AttachLoss.apply(probs, aux_loss * self.grad_scale)
        if record:
            self._record(routing_map, routed, aux_loss, z_loss)
        return probs, routing_map

    def _load_balancing_loss(self, scores: torch.Tensor, routing_map: torch.Tensor):
        """scores [N, E] (grad), routing_map [N, E] -> this rank's share of L (class docstring)."""
        counts = routing_map.sum(dim=0).to(scores.dtype)  # [E] tokens routed to each expert
        dp = 1
        if self.dp_group is not None and torch.distributed.get_world_size(self.dp_group) > 1:
            dp = torch.distributed.get_world_size(self.dp_group)
            torch.distributed.all_reduce(counts, group=self.dp_group)
        n_local = scores.shape[0]
        n_global = n_local * dp  # every rank's micro-batch has the same shape
        scale = self.aux_coeff * self.num_experts / (self.topk * n_local * n_global)
        return (scores.sum(dim=0) * counts).sum() * scale

    @torch.no_grad()
    def _record(self, routing_map, routed, aux_loss, z_loss) -> None:
        if self.stats.dtype != torch.float64:  # a whole-module cast (DeepSpeed's bf16) undone
            self.stats.data = self.stats.data.double()
        kept = routing_map.sum(dim=0).to(torch.float64)  # [E]
        if self.enable_expert_bias:
            if self.local_tokens_per_expert.dtype != torch.float32:  # bf16 counts are inexact
                self.local_tokens_per_expert.data = self.local_tokens_per_expert.data.float()
            self.local_tokens_per_expert += kept.float()
        zero = torch.zeros((), dtype=torch.float64, device=kept.device)
        scalars = torch.stack(
            [
                torch.ones((), dtype=torch.float64, device=kept.device),
                zero if aux_loss is None else aux_loss.detach().double(),
                zero if z_loss is None else z_loss.detach().double(),
                (routed.sum() - routing_map.sum()).double(),
                routed.sum().double(),
            ]
        )
        self.stats += torch.cat([kept, scalars])

    def forward(self, input: torch.Tensor, padding_mask=None):
        return self.routing(self.gating(input))

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """After an optimizer step: move each expert's bias by `bias_rate` towards balance, by
        the sign of (mean load - its load) over the step's tokens on every data-parallel rank."""
        if not self.enable_expert_bias:
            return
        counts = self.local_tokens_per_expert
        if self.dp_group is not None and torch.distributed.get_world_size(self.dp_group) > 1:
            torch.distributed.all_reduce(counts, group=self.dp_group)
        self.expert_bias += torch.sign(counts.mean() - counts) * self.bias_rate
        counts.zero_()


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all over `group`: rank r sends `send[i]` rows to rank i and receives
    `recv[i]` from it; the backward pass sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, group, send: list[int], recv: list[int]):
        ctx.group, ctx.send, ctx.recv = group, send, recv
        out = x.new_empty((sum(recv), *x.shape[1:]))
        torch.distributed.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        torch.distributed.all_to_all_single(
            back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group
        )
        return back, None, None, None


class _SumGradients(torch.autograd.Function):
    """Identity; the backward pass sums the gradient over `group`. Megatron's
    `copy_to_tensor_model_parallel_region` does this too, but all-reduces `grad.contiguous()`
    in place: for the probabilities' gradient, a transposed view, the sum lands in a copy and
    is lost."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if _group_size(ctx.group) > 1:
            torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _group_size(group) -> int:
    return torch.distributed.get_world_size(group) if group is not None else 1


class ExpertDispatcher:
    """Token exchange between the expert-parallel ranks of an MoE layer.

        dispatch: tokens [N, h] -> permuted by expert (Megatron's `permute`) -> all-to-all to
                  the rank owning each expert -> grouped by local expert (`sort_chunks_by_idxs`)
        combine:  the inverse, then the k outputs of each token summed (`unpermute`)

    Rank r of the EP group holds experts [r*E_l, (r+1)*E_l). The split sizes need the counts
    on the host: one all-gather of E counts and one device sync per layer and micro-batch (as in
    Megatron's dispatchers).
    """

    def __init__(self, num_experts: int, ep_group, ep_size: int, ep_rank: int):
        self.num_experts, self.group, self.ep, self.rank = num_experts, ep_group, ep_size, ep_rank
        self.local = num_experts // ep_size
        # received chunks are (source rank, local expert); experts want (local expert, rank)
        chunks = torch.arange(ep_size * self.local)
        self.to_experts = chunks.reshape(ep_size, self.local).T.ravel()
        self.from_experts = chunks.reshape(self.local, ep_size).T.ravel()

    def dispatch(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        """tokens [N, h], probs and routing_map [N, E] -> (expert inputs [M, h], tokens per
        local expert [E_l] (host), their probs [M])."""
        self.shape, self.routing_map = tokens.shape, routing_map
        permuted, permuted_probs, self.sorted_indices = permute(tokens, routing_map, probs=probs)
        counts = routing_map.sum(dim=0)  # [E] assignments of this rank's tokens per expert
        if self.ep == 1:
            return permuted, counts.cpu(), permuted_probs
        gathered = [torch.empty_like(counts) for _ in range(self.ep)]
        torch.distributed.all_gather(gathered, counts, group=self.group)
        table = torch.stack(gathered).cpu()  # [ep, E]: rank i's assignments per expert
        mine = table[:, self.rank * self.local : (self.rank + 1) * self.local]  # [ep, E_l]
        self.send = table[self.rank].view(self.ep, self.local).sum(dim=1).tolist()  # rows to
        self.recv = mine.sum(dim=1).tolist()  # ... and from each EP rank
        self.chunks = mine.ravel()  # received chunk sizes, (source rank, local expert) order
        x = _AllToAll.apply(permuted, self.group, self.send, self.recv)
        p = _AllToAll.apply(permuted_probs, self.group, self.send, self.recv)
        if self.local > 1:
            x, p = sort_chunks_by_idxs(x, self.chunks, self.to_experts, probs=p)
        return x, mine.sum(dim=0), p

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """Expert outputs [M, h] (probabilities applied) -> [N, h], each token's k summed."""
        if self.ep > 1:
            if self.local > 1:
                sizes = self.chunks.view(self.ep, self.local).T.ravel()
                out, _ = sort_chunks_by_idxs(out, sizes, self.from_experts)
            out = _AllToAll.apply(out, self.group, self.recv, self.send)
        return unpermute(
            out, self.sorted_indices, restore_shape=self.shape, routing_map=self.routing_map
        )


class MoEBlock(MegatronModule):
    """The MLP of an MoE transformer layer: router, routed experts (this EP rank's), optional
    shared experts. Takes and returns what a Megatron MLP does: hidden [s, b, h] -> (out, None).
    """

    def __init__(self, config, pg_collection, *, linear_fc2):
        super().__init__(config=config)
        self.router = Router(config, pg_collection, dp_group=pg_collection.dp)
        ep = torch.distributed.get_world_size(pg_collection.ep) if pg_collection.ep else 1
        ep_rank = torch.distributed.get_rank(pg_collection.ep) if ep > 1 else 0
        self.num_local_experts = config.num_moe_experts // ep
        self.ep_rank = ep_rank
        self.tp_group = pg_collection.tp
        submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=linear_fc2)
        self.experts = SequentialMLP(
            self.num_local_experts, config, submodules, pg_collection=pg_collection
        )
        for p in self.experts.parameters():  # held by the ranks of one expert-data group only
            p.expert_parallel = True
            # Megatron marks expert-parallel weights `allreduce=False`, which DeepSpeed takes for
            # its own MoE parameters (and then wants its expert groups); the fused optimizer
            # reduces them by `expert_parallel` instead
            if hasattr(p, "allreduce"):
                del p.allreduce
        self.sequence_parallel = config.sequence_parallel
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            # the shared experts take the gathered sequence like the routed ones (forward), so
            # they are built as without sequence parallelism: their linears do not gather or
            # scatter again, and the gate's weight sees every token (its gradient whole)
            shared = copy.copy(config)
            shared.sequence_parallel = False
            self.shared_experts = SharedExpertMLP(
                shared, submodules, gate=config.moe_shared_expert_gate, pg_collection=pg_collection
            )
        self.dispatcher = ExpertDispatcher(config.num_moe_experts, pg_collection.ep, ep, ep_rank)

    def forward(self, hidden: torch.Tensor, padding_mask=None, **kwargs):
        local = hidden  # [s/tp, b, h] under sequence parallelism
        if self.sequence_parallel:
            # every TP rank routes every token (as without sequence parallelism); the gradient
            # reaching the gathered tokens is whole on each rank, so backward keeps the slice
            hidden = gather_from_sequence_parallel_region(
                local, tensor_parallel_output_grad=False, group=self.tp_group
            )
        s, b, h = hidden.shape
        # the ranges name the stages in profiles (bench/moe_step.py); nearly free otherwise
        with record_function("moe/router"):
            probs, routing_map = self.router(hidden)  # [N, E] each, N = s * b
        with record_function("moe/dispatch"):
            # Each TP rank's experts see the gradient of their own slice's output only: both
            # the tokens and the probabilities enter through the TP copy, whose backward sums
            # them (the probabilities after their attached losses, whole on every TP rank).
            flat = hidden.reshape(s * b, h)
            tokens = copy_to_tensor_model_parallel_region(flat, group=self.tp_group)
            probs = _SumGradients.apply(probs, self.tp_group)
            x, per_expert, x_probs = self.dispatcher.dispatch(tokens, probs, routing_map)
        with record_function("moe/experts"):
            out, _ = self.experts(x, per_expert, x_probs)  # TP-partial sums, probs applied
        with record_function("moe/combine"):
            out = self.dispatcher.combine(out).view(s, b, h)  # TP-partial sums
            if self.sequence_parallel:  # summed over TP and cut back to this rank's slice
                out = reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
            else:
                out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        if self.shared_experts is not None:
            shared = self.shared_experts(hidden)  # [s, b, h], whole on every TP rank
            if self.sequence_parallel:  # backward all-gathers: the whole gradient on each rank
                shared = scatter_to_sequence_parallel_region(shared, group=self.tp_group)
            out = out + shared
        return out, None

    def set_layer_number(self, layer_number: int) -> None:
        self.router.set_layer_number(layer_number)


def expert_groups():
    """Megatron-core's process groups as the MoE layers take them (its default collection, plus
    the data-parallel group the load-balancing counts are summed over)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    groups = get_default_pg_collection()
    groups.dp = parallel_state.get_data_parallel_group()
    return groups


def moe_blocks(module: torch.nn.Module) -> list[MoEBlock]:
    return [m for m in module.modules() if isinstance(m, MoEBlock)]


def canonical_experts(module: torch.nn.Module, named) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of `module` with each routed expert renamed by its global index
    (`pretrain.model.sharding.canonical_expert_name`); dense models pass through."""
    from pretrain.model.sharding import canonical_expert_name

    blocks = moe_blocks(module)
    if not blocks:
        return list(named)
    place = dict(ep_rank=blocks[0].ep_rank, local_experts=blocks[0].num_local_experts)
    return [(canonical_expert_name(n, **place), t) for n, t in named]


@contextlib.contextmanager
def experts_kept(module: torch.nn.Module):
    """Keep the routed experts' values through the block: DeepSpeed's engine broadcasts every
    parameter it does not know as its own MoE parameter from data-parallel rank 0, which would
    give every expert-parallel rank rank 0's experts."""
    experts = [p for p in module.parameters() if getattr(p, "expert_parallel", False)]
    kept = [p.detach().clone() for p in experts]
    yield
    with torch.no_grad():
        for p, value in zip(experts, kept, strict=True):
            p.copy_(value)


def expert_biases(module: torch.nn.Module, named_buffers) -> list[tuple[str, torch.Tensor]]:
    """The routers' expert-bias buffers among `named_buffers`, canonically named: training
    state that is not a parameter, checkpointed (and loaded) with the weights."""
    named = canonical_experts(module, named_buffers)
    return [(name, b) for name, b in named if name.endswith(".expert_bias")]


def model_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A single-device model's (canonical name, tensor) pairs a checkpoint fills: its
    parameters and the routers' expert biases."""
    params = canonical_experts(module, module.named_parameters())
    return params + expert_biases(module, module.named_buffers())


def set_router_grad_scale(module: torch.nn.Module, scale: float) -> None:
    for block in moe_blocks(module):
        block.router.grad_scale = scale


def update_expert_biases(module: torch.nn.Module) -> None:
    """After each optimizer step (`model.moe.expert_bias_update_rate`)."""
    for block in moe_blocks(module):
        block.router.update_expert_bias()
