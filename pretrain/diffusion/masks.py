"""Attention patterns of the objectives (True = may attend); all [s_q, s_k] bool.

The model takes any pattern (`pretrain.model.masks.AttentionMask`); which pattern an objective
needs is decided here, with the objective.
"""

from __future__ import annotations

import torch


def causal_mask(s: int, device=None) -> torch.Tensor:
    """[s, s]: position i attends j <= i (autoregressive)."""
    return torch.ones(s, s, dtype=torch.bool, device=device).tril()


def block_causal_mask(s: int, block: int, device=None) -> torch.Tensor:
    """[s, s]: i attends j iff block(j) <= block(i), block(i) = i // block. What a block-diffusion
    model sees at generation: the current (noisy) block and the clean blocks before it."""
    ids = torch.arange(s, device=device) // block
    return ids[None, :] <= ids[:, None]


def block_diffusion_mask(length: int, block: int, device=None) -> torch.Tensor:
    """[2L, 2L] for the vectorised block-diffusion input [x_t ; x0] (BD3-LM):

        M = M_BD | M_OBC | M_BC, with b(i) the block of position i within its half:
        M_BD  (noisy -> noisy): b(i) == b(j)   a noisy block sees itself (bidirectionally);
        M_OBC (noisy -> clean): b(j) <  b(i)   and the clean blocks before it;
        M_BC  (clean -> clean): b(j) <= b(i)   clean tokens see clean blocks causally.
    Clean tokens never see noisy ones, so the x0 half computes exactly the context a per-block
    forward pass would.
    """
    ids = torch.arange(2 * length, device=device)
    noisy = ids < length
    blk = (ids % length) // block
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = blk[:, None], blk[None, :]
    m_bd = qn & kn & (qb == kb)
    m_obc = qn & ~kn & (kb < qb)
    m_bc = ~qn & ~kn & (kb <= qb)
    return m_bd | m_obc | m_bc
