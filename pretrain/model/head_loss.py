"""The sparse head's cross-entropy with its logit gradient kept from the forward pass
(`model.sparse_output_recompute: false`).

For one chunk of c masked rows with logits z [c, V] (excluded ids at -inf) and targets y [c]:

    ce_i = logsumexp(z_i) - z_i[y_i]        d ce_i / d z_i = softmax(z_i) - onehot(y_i) =: G_i

Everything downstream of the per-token CE (the diffusion weights, the mean) is a function of ce
alone, so the backward pass only ever needs dz_i = dce_i * G_i. `StoredGradientCE` computes G
in the forward pass, where the softmax is being taken anyway, and keeps it (in the logits'
dtype: n x V/tp, about 2 GB for 8 x 2048 tokens half masked at LLaDA's 126k vocab in bf16)
instead of the logits. The default path keeps neither and recomputes the chunk's output-layer
GEMM and softmax in the backward (`OutputHead.sparse_cross_entropy`); this one trades that
GEMM (2 n h V FLOPs) and a pass over the logits for G's memory. The output layer itself stays
Megatron's module with its own backward (dx = dz W, dW = dz^T x), so TP, FP8 and ZeRO-3's
parameter gathering are unchanged.

Under tensor parallelism each rank holds the logits of its vocabulary slice [start, start +
V/tp): the max, the sum of exponentials and the target's logit are all-reduced over the TP
group (what Megatron's `vocab_parallel_cross_entropy` does), and G is this rank's slice.
Hand-written because no maintained library returns the per-token CE with this backward for
vocab-parallel logits: Liger-kernel's fused linear cross-entropy reduces the loss to a scalar
(its gradient-in-forward trick needs a scalar upstream gradient) and runs on one rank only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def ce_and_logit_grad(
    logits: torch.Tensor, excluded: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [c, V] (the whole vocabulary), excluded [V] bool, targets [c] -> (ce [c] fp32,
    G [c, V] in logits' dtype). One rank; `OutputHead.compile_loss` compiles it."""
    z = logits.float().masked_fill(excluded, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)  # [c]
    ce = lse - z.gather(1, targets[:, None]).squeeze(1)
    grad = torch.exp(z - lse[:, None]).scatter_add(1, targets[:, None], -torch.ones_like(z[:, :1]))
    return ce, grad.to(logits.dtype)


def scale_rows(grad: torch.Tensor, dce: torch.Tensor) -> torch.Tensor:
    """G [c, V] x dce [c] fp32 -> d logits [c, V] in G's dtype, the product taken in fp32 and
    rounded once (as autograd's fp32 softmax backward would); `compile_loss` compiles it."""
    return (grad.float() * dce[:, None]).to(grad.dtype)


def vocab_parallel_ce_and_logit_grad(
    logits: torch.Tensor, excluded: torch.Tensor, targets: torch.Tensor, start: int, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [c, V/tp] of this rank's slice [start, start + V/tp), excluded [V/tp] bool,
    targets [c] (global ids) -> (ce [c] fp32, this rank's G [c, V/tp]). Collective over
    `group` (three all-reduces of [c] vectors)."""
    z = logits.float().masked_fill(excluded, float("-inf"))
    top = z.max(dim=-1).values  # [c]; -inf on a slice that is all padding
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    exp = torch.exp(z - top[:, None])
    total = exp.sum(dim=-1)
    dist.all_reduce(total, group=group)
    local = targets - start
    mine = (local >= 0) & (local < z.shape[1])
    index = local.clamp(0, z.shape[1] - 1)[:, None]  # [c, 1]
    picked = torch.where(mine, z.gather(1, index).squeeze(1), 0.0)
    dist.all_reduce(picked, group=group)
    ce = torch.log(total) + top - picked
    grad = exp / total[:, None]
    grad = grad.scatter_add(1, index, -mine.to(grad.dtype)[:, None])
    return ce, grad.to(logits.dtype)


class StoredGradientCE(torch.autograd.Function):
    """logits [c, V/tp] -> ce [c] fp32, keeping only G [c, V/tp] for the backward:
    d logits = dce[:, None] * G (in G's dtype, as the output layer's backward takes it).
    `fns` = (ce_and_logit_grad, scale_rows), compiled or not; `group` None on one rank."""

    @staticmethod
    def forward(ctx, logits, excluded, targets, start: int, group, fns):
        ce_fn, ctx.scale = fns
        if group is None:
            ce, grad = ce_fn(logits, excluded, targets)
        else:
            ce, grad = vocab_parallel_ce_and_logit_grad(logits, excluded, targets, start, group)
        ctx.save_for_backward(grad)
        return ce

    @staticmethod
    def backward(ctx, dce):
        (grad,) = ctx.saved_tensors
        return ctx.scale(grad, dce.float()), None, None, None, None, None
