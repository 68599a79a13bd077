"""The forward (corruption) process: sampling t and masking tokens, reproducibly.

Randomness is derived from (seed, step, index of the sequence in the step's global batch) and
never from a process-global RNG, so that
  * every tensor/pipeline rank of one data-parallel replica draws the same masks (they must agree
    on the input of a shared forward pass), while different replicas draw different ones;
  * the corruption of a sequence does not depend on how the global batch is split into
    micro-batches and replicas: a DP=2 run masks exactly as a single process with twice the
    micro-batch (what makes layouts comparable, and a resume at another DP size exact);
  * a resumed run corrupts step N exactly as an uninterrupted run would, with no RNG state saved;
  * CPU and GPU runs mask identically (generators live on the CPU; the masks are small).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def derived_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `key` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@dataclass(frozen=True)
class CorruptionKey:
    """Where a micro-batch sits in the global batch of an optimizer step.

    The global batch of a step has `micro_batches * replicas * batch_size` sequences, ordered
    micro-batch-major then replica then row: the order the data stream hands them out in.
    """

    seed: int
    step: int
    micro: int = 0
    replica: int = 0
    micro_batches: int = 1
    replicas: int = 1

    def offset(self, batch_size: int) -> int:
        return (self.micro * self.replicas + self.replica) * batch_size

    def total(self, batch_size: int) -> int:
        return self.micro_batches * self.replicas * batch_size

    def row_generators(self, batch_size: int, purpose: str) -> list[torch.Generator]:
        """One generator per sequence, keyed by its index in the step's global batch."""
        first = self.offset(batch_size)
        return [
            derived_generator(self.seed, purpose, self.step, j)
            for j in range(first, first + batch_size)
        ]


def sample_times(
    batch_size: int, key: CorruptionKey, *, eps: float, antithetic: bool
) -> torch.Tensor:
    """t [batch_size] in [eps, 1].

    Antithetic (stratified) sampling across the global batch: one u ~ U(0, 1) per step, shared by
    all micro-batches and replicas, and t_j = (u + j / G) mod 1 for global index j of G. Every
    interval [k/G, (k+1)/G) then holds exactly one t, so the t-distribution of a batch is U(0, 1)
    without clumps.
    """
    if antithetic:
        u = torch.rand(1, generator=derived_generator(key.seed, "t", key.step), dtype=torch.float64)
        j = torch.arange(batch_size, dtype=torch.float64) + key.offset(batch_size)
        t = torch.remainder(u + j / key.total(batch_size), 1.0)
    else:
        gens = key.row_generators(batch_size, "t")
        t = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
    return (eps + (1.0 - eps) * t).float()


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without making the host wait for the GPU's queued work.

    A plain `.to("cuda")` of pageable memory synchronises the stream first, so the host stops
    running ahead of the GPU once per copy. A copy from pinned memory with `non_blocking` is
    ordered on the stream instead; PyTorch's pinned-memory cache keeps the staging buffer alive
    until the copy has run.
    """
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def mask_tokens(
    x0: torch.Tensor,
    alpha: torch.Tensor,
    mask_id: int,
    generators: list[torch.Generator],
    maskable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Each position independently stays x0 with probability alpha, else becomes `mask_id`.

    x0 [b, s]; alpha broadcastable to [b, s] (per-sequence [b, 1] or per-position [b, s]);
    generators: one per row; maskable [b, s] bool or None: positions that may be masked (a clean
    prefix stays visible). Returns (x_t [b, s], masked [b, s] bool, count): `count` is the number
    of masked positions when the mask was decided on the host (alpha and maskable on the CPU, as
    on the default path), else None; knowing it lets the model size its loss rows without
    asking the GPU.
    """
    u = torch.stack([torch.rand(x0.shape[1], generator=g) for g in generators])  # [b, s] CPU
    on_host = alpha.device.type == "cpu" and (maskable is None or maskable.device.type == "cpu")
    if on_host:
        masked = u >= alpha
        if maskable is not None:
            masked &= maskable
        count = int(masked.sum())
        masked = to_device(masked, x0.device)
    else:
        masked = to_device(u, x0.device) >= alpha.to(x0.device)
        if maskable is not None:
            masked &= maskable.to(x0.device)
        count = None
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, count
