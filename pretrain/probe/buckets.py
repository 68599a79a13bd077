"""Validation cross-entropy bucketed by the distance to the nearest visible token.

A masked position's distance is min |i - j| over unmasked positions j (either side). The
corruption is the linear schedule on a fixed t-grid with fixed masks, whatever schedule trained the
model, so runs with different schedules are measured on the same masks. Buckets are powers of two:
1, 2, 3-4, 5-8, ..., so that the counts stay comparable in each bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.objective import MaskedDiffusion
from pretrain.diffusion.schedules import build_schedule

CeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, x0) [b, s] -> CE [b, s]


def nearest_visible_distance(masked: torch.Tensor) -> torch.Tensor:
    """masked [b, s] bool -> [b, s] long: distance to the nearest unmasked position (0 where
    unmasked; s where the whole row is masked)."""
    b, s = masked.shape
    index = torch.arange(s, device=masked.device).expand(b, s)
    big = torch.full_like(index, 10 * s)
    left = torch.where(~masked, index, -big).cummax(dim=1).values  # last visible <= i
    right = torch.where(~masked, index, big).flip(1).cummin(dim=1).values.flip(1)  # first >= i
    return torch.minimum(index - left, right - index).clamp(max=s)


def bucket_edges(max_distance: int) -> list[tuple[int, int]]:
    """[(1, 1), (2, 2), (3, 4), (5, 8), ...] up to max_distance."""
    edges, lo = [], 1
    while lo <= max_distance:
        hi = 1 if lo == 1 else 2 * (lo - 1)
        edges.append((lo, min(hi, max_distance)))
        lo = hi + 1
    return edges


@torch.no_grad()
def distance_bucketed_ce(
    ce_fn: CeFn, batches: Sequence[torch.Tensor], *, mask_id: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """{"1": {"ce": ..., "count": ...}, "2": ..., "3-4": ...}: mean CE per masked token."""
    corrupt = MaskedDiffusion(
        build_schedule("linear"),
        mask_id=mask_id,
        eps=1e-3,
        antithetic=True,
        normalization="token_slot",
    )
    s = batches[0].shape[1]
    edges = bucket_edges(s)
    sums = torch.zeros(len(edges), dtype=torch.float64)
    counts = torch.zeros(len(edges), dtype=torch.float64)
    for i, x0 in enumerate(batches):
        batch = corrupt.prepare_eval(x0, CorruptionKey(seed, 0, i, 0, len(batches), 1))
        ce = ce_fn(batch.inputs, x0).double().cpu()
        dist = nearest_visible_distance(batch.masked).cpu()
        masked = batch.masked.cpu()
        for k, (lo, hi) in enumerate(edges):
            sel = masked & (dist >= lo) & (dist <= hi)
            sums[k] += ce[sel].sum()
            counts[k] += sel.sum()
    out = {}
    for k, (lo, hi) in enumerate(edges):
        if counts[k] > 0:
            label = str(lo) if lo == hi else f"{lo}-{hi}"
            out[label] = {"ce": float(sums[k] / counts[k]), "count": int(counts[k])}
    return out
