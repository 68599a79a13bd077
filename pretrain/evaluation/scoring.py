"""Scoring token-level requests: plans -> batched forwards -> (log-likelihood, standard error).

Reproducibility by construction:
  * each request's masks come from a generator keyed by its context and continuation length
    (`request_generator`), never by its position;
  * requests are ordered by (padded length, content digest), never by arrival, so the rows a
    forward holds do not depend on the order requests come in; identical requests are scored once;
  * rows are padded to a multiple of `pad_multiple` and a batch only holds rows of one padded
    length, so a row's input tensor is the same whatever else shares its batch;
  * with several processes, rank r scores every world-th request of that order (a deterministic,
    length-balanced share) and every rank receives all scores.
What remains is floating-point rounding of batched kernels (a row's result may change in the last
bits with the batch size), which the tests bound.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.errors import DataError
from pretrain.evaluation.distributed import DataParallel
from pretrain.evaluation.estimator import RequestPlan, combine, request_generator
from pretrain.evaluation.layouts import Layout

LOGIT_CHUNK_BYTES = 1 << 30
"""Largest fp32 logits block materialised at once when projecting the scored positions."""


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]
    continuation: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.context) + len(self.continuation)

    def draw(self) -> bytes:
        """What the masks are keyed by (with the seed): the context and the continuation length."""
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(self.context, dtype=np.int64).tobytes())
        h.update(f"|{len(self.continuation)}".encode())
        return h.digest()

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(self.context, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(self.continuation, dtype=np.int64).tobytes())
        return h.digest()


@dataclass(frozen=True)
class Score:
    loglik: float
    """The estimate of log p(continuation | context): a lower bound in expectation (exact: `ar`)."""
    stderr: float
    """Monte-Carlo standard error of `loglik` (0 when exact)."""
    greedy: bool
    """Every continuation token is the argmax with the whole continuation masked (one-step
    parallel greedy decode; for `ar`, teacher-forced argmax at every position)."""
    tokens: int
    values: tuple[float, ...] = ()
    """The Monte-Carlo sample values X_s (weighted CE sums), for differences between requests."""
    levels: tuple[float, ...] = ()
    strata: int = 1
    draw: bytes = b""
    """Equal for requests scored on the same masks (same context and continuation length)."""

    def difference_stderr(self, other: Score) -> float:
        """Standard error of self.loglik - other.loglik: from the paired sample differences when
        both were scored on the same masks (common random numbers), else the independent sum."""
        if self.draw and self.draw == other.draw and len(self.values) > 1:
            diff = torch.tensor(self.values) - torch.tensor(other.values)
            return combine(diff, torch.tensor(self.levels), self.strata)[1]
        return math.hypot(self.stderr, other.stderr)


@dataclass
class ScoringStats:
    requests: int = 0
    forwards: int = 0
    rows: int = 0
    seconds: float = 0.0
    per_kind: dict = field(default_factory=dict)

    def add(self, kind: str, requests: int, seconds: float) -> None:
        entry = self.per_kind.setdefault(kind, {"requests": 0, "seconds": 0.0})
        entry["requests"] += requests
        entry["seconds"] += seconds


class Scorer:
    def __init__(
        self,
        net,
        layout: Layout,
        *,
        samples: int,
        batch_size: int,
        seed: int,
        max_length: int,
        pad_id: int,
        pad_multiple: int = 8,
        greedy: bool = True,
        future_masks: bool = False,
        dp: DataParallel | None = None,
    ):
        if samples < 1 or batch_size < 1 or pad_multiple < 1:
            raise ValueError("mc_samples, batch_size and pad_multiple must be positive")
        self.net, self.layout = net, layout
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.max_length, self.pad_id, self.pad_multiple = max_length, pad_id, pad_multiple
        self.greedy = greedy
        self.future_masks = future_masks and layout.sees_future
        """Rows run at `max_length`, the positions after the continuation filled with masks:
        the input a model trained only on full-length windows has seen (the rest of the window
        unknown), instead of a sequence ending after the continuation. Costs max_length-long
        rows; off by default (no difference measured on the demo models)."""
        self.dp = dp or DataParallel.single()
        self.stats = ScoringStats()

    # -- requests ---------------------------------------------------------------------------
    def fit(self, context: Sequence[int], continuation: Sequence[int]) -> Request:
        """Drop the context's oldest tokens so that context + continuation <= max_length."""
        n = len(continuation)
        if n == 0:
            raise DataError("loglikelihood: a request has an empty continuation")
        if n >= self.max_length:
            raise DataError(
                f"loglikelihood: a continuation of {n} tokens leaves no room for context within "
                f"max_length {self.max_length}"
            )
        keep = self.max_length - n
        return Request(tuple(context[-keep:]), tuple(continuation))

    def score(self, requests: Sequence[Request]) -> list[Score]:
        """Scores in the order of `requests`, identical on every rank."""
        start = time.perf_counter()
        unique = sorted(set(requests), key=lambda r: (self.padded(r.length), r.digest()))
        mine = unique[self.dp.rank :: self.dp.size]
        local = self._score_all(mine)
        merged = self.dp.gather_dict(local)
        self.stats.requests += len(requests)
        self.stats.seconds += time.perf_counter() - start
        return [merged[r] for r in requests]

    def padded(self, length: int) -> int:
        if self.future_masks:
            return self.max_length
        return math.ceil(length / self.pad_multiple) * self.pad_multiple

    # -- rows -------------------------------------------------------------------------------
    def plan(self, request: Request) -> RequestPlan:
        gen = request_generator(self.seed, request.context, len(request.continuation))
        return self.layout.plan(
            len(request.context),
            len(request.continuation),
            self.samples,
            gen,
            greedy_row=self.greedy and not self.layout.exact,
        )

    def _score_all(self, requests: list[Request]) -> dict[Request, Score]:
        plans = [self.plan(r) for r in requests]
        rows = [(i, j) for i, p in enumerate(plans) for j in range(p.masked.shape[0])]
        # requests are in padded-length order: consecutive rows share a length bucket
        values = torch.zeros(len(rows), dtype=torch.float64)
        correct = torch.zeros(len(rows), dtype=torch.bool)
        start = 0
        while start < len(rows):
            bucket = self.padded(requests[rows[start][0]].length)
            stop = start
            while (
                stop < len(rows)
                and stop - start < self.batch_size
                and self.padded(requests[rows[stop][0]].length) == bucket
            ):
                stop += 1
            batch = rows[start:stop]
            v, c = self._forward(batch, requests, plans, bucket)
            values[start:stop], correct[start:stop] = v, c
            start = stop
        out, cursor = {}, 0
        for request, plan in zip(requests, plans, strict=True):
            r = plan.masked.shape[0]
            v, c = values[cursor : cursor + r], correct[cursor : cursor + r]
            cursor += r
            if plan.exact:
                ll, se, greedy = -float(v[0]), 0.0, bool(c[0])
            else:
                ll, se = combine(v[: plan.samples], plan.levels, plan.strata)
                greedy = bool(c[plan.greedy_row]) if self.greedy else False
            samples = tuple(v[: plan.samples].tolist())
            levels = tuple(plan.levels.tolist())
            n = len(request.continuation)
            out[request] = Score(ll, se, greedy, n, samples, levels, plan.strata, request.draw())
        return out

    @torch.no_grad()
    def _forward(self, batch, requests, plans, length: int):
        """One forward over rows of one padded length -> (weighted CE sum [b], all-argmax [b])."""
        b = len(batch)
        x0 = torch.full((b, length), self.pad_id, dtype=torch.long)
        hidden = torch.zeros(b, length, dtype=torch.bool)
        weights = torch.zeros(b, length, dtype=torch.float64)
        valid = torch.zeros(b, length, dtype=torch.bool)
        for row, (i, j) in enumerate(batch):
            req, plan = requests[i], plans[i]
            p, total = len(req.context), req.length
            x0[row, :total] = torch.tensor(req.context + req.continuation)
            hidden[row, p:total] = plan.masked[j]
            weights[row, p:total] = plan.weights[j]
            valid[row, :total] = True
        if self.future_masks:  # the unknown rest of the window: masks, attended, never scored
            x0 = torch.where(valid, x0, self.layout.mask_id)
            valid = torch.ones_like(valid)
        inputs = self.layout.inputs(x0, hidden, valid)
        rows, cols = hidden.nonzero(as_tuple=True)  # the scored positions, row-major
        src = inputs.source[rows, cols]
        device = self.net.device
        read = scored_positions_read(
            rows.to(device), src.to(device), x0[rows, cols].to(device), self.net.vocab_size
        )
        out = self.net.run(inputs.model, read, (2, rows.numel())).cpu()  # [2, m]
        ce, hit = out[0].double(), out[1] > 0.5
        value = torch.zeros(b, dtype=torch.float64).index_add_(0, rows, ce * weights[rows, cols])
        wrong = torch.zeros(b, dtype=torch.long).index_add_(0, rows, (~hit).long())
        self.stats.forwards += 1
        self.stats.rows += b
        return value, wrong == 0


def scored_positions_read(rows, sources, targets, vocab_size: int):
    """The `read` of a scoring forward: hidden [s, b, h] -> [2, m] fp32, the cross-entropy of
    each scored position's target (from the hidden state at (sources[k], rows[k])) and whether
    the target is the argmax. The logits of at most LOGIT_CHUNK_BYTES are made at once; under
    tensor parallelism the head gathers the vocabulary slices (every TP rank runs these rows)."""
    chunk = max(1, LOGIT_CHUNK_BYTES // (4 * vocab_size))

    def read(hidden, head) -> torch.Tensor:
        states = hidden[sources, rows]  # [m, h]
        parts = [torch.zeros(2, 0, device=hidden.device)]
        for lo in range(0, states.shape[0], chunk):
            logits = head.full_logits(states[lo : lo + chunk, None])[0]  # [c, V] fp32
            t = targets[lo : lo + chunk]
            ce = F.cross_entropy(logits, t, reduction="none")
            parts.append(torch.stack([ce, (logits.argmax(dim=-1) == t).float()]))
        return torch.cat(parts, dim=1)

    return read
