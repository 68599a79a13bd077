"""Synthetic tasks with known joint constraints, and a tiny trainer, for measuring the
parallel-decoding gap (tests/test_joint_consistency.py, experiments/joint_consistency_*.py).

`ConstraintTask`: sequences of length L over K symbols and F filler tokens. Position 0 is a fixed
`<bos>` (the decoding prompt: with RoPE alone a fully masked sequence gives the model no absolute
position). Each group of positions (a pair, a triple, ...) carries one symbol, drawn uniformly
from K independently of the other groups; every other position is an independent uniform filler.
Every per-position marginal is uniform, so a perfect marginal-only model decoding a group in one
step agrees with probability exactly 1/K^(|group|-1); only a model (or decoder) that captures
the joint does better. `PAIR_TASK` is the one-pair task, `MULTI_TASK` has several constraints
(three pairs at distances 1, 8 and 9, and a triple) in one sequence.

`train_tiny` trains a small `DLMTransformer` through the real masked-diffusion objective,
optionally with auxiliary losses, in plain PyTorch (seconds on a CPU). Needs the Megatron
process groups of one process (`pretrain.parallel.runtime.init_runtime`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pretrain.config.schema import AuxiliaryLossConfig, DiffusionConfig, ModelConfig
from pretrain.diffusion.auxiliary.base import AuxiliarySet, ModelView
from pretrain.diffusion.auxiliary.registry import AUXILIARIES
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.objective import build_objective


@dataclass(frozen=True)
class ConstraintTask:
    symbols: int = 8
    """K: each group's symbol is uniform over ids 0..K-1."""
    fillers: int = 4
    """Filler ids K..K+F-1."""
    length: int = 16
    groups: tuple[tuple[int, ...], ...] = ((1, 2), (3, 11), (5, 14), (7, 9, 13))
    """Positions that must carry the same symbol (disjoint, never 0)."""

    @property
    def bos_id(self) -> int:
        return self.symbols + self.fillers

    @property
    def mask_id(self) -> int:
        return self.bos_id + 1

    @property
    def vocab_size(self) -> int:
        return self.mask_id + 1

    @property
    def marginal_rate(self) -> float:
        """Mean agreement per group of independent uniform draws: mean of K^-(|g| - 1)."""
        return sum(self.symbols ** (1 - len(g)) for g in self.groups) / len(self.groups)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n clean sequences [n, L]."""
        x = self.symbols + torch.randint(0, self.fillers, (n, self.length), generator=generator)
        for group in self.groups:
            symbol = torch.randint(0, self.symbols, (n,), generator=generator)
            for position in group:
                x[:, position] = symbol
        x[:, 0] = self.bos_id
        return x

    def prompt(self, n: int) -> torch.Tensor:
        """The decoding prompt [n, 1]: `<bos>`; decode `length - 1` tokens after it."""
        return torch.full((n, 1), self.bos_id, dtype=torch.long)

    def group_agreement(self, x: torch.Tensor) -> torch.Tensor:
        """[n, groups] bool: the group's positions carry one symbol (a symbol, not a filler)."""
        columns = []
        for group in self.groups:
            first = x[:, group[0]]
            same = torch.stack([x[:, p] == first for p in group[1:]], dim=1).all(dim=1)
            columns.append(same & (first < self.symbols))
        return torch.stack(columns, dim=1)

    def agreement(self, x: torch.Tensor) -> float:
        """Mean over sequences and groups of the group agreeing (marginal: `marginal_rate`)."""
        return self.group_agreement(x).float().mean().item()

    def validity(self, x: torch.Tensor) -> float:
        """Fraction of sequences in which every group agrees."""
        return self.group_agreement(x).all(dim=1).float().mean().item()


PAIR_TASK = ConstraintTask(length=8, groups=((1, 6),))
MULTI_TASK = ConstraintTask()


@dataclass
class TinyRun:
    model: torch.nn.Module
    view: ModelView
    seconds_per_step: float
    extra_forwards_per_step: float


def train_tiny(
    task: ConstraintTask,
    losses: list[AuxiliaryLossConfig],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    model_cfg: ModelConfig | None = None,
) -> TinyRun:
    """Train a small DLM on `task` with the masked-diffusion NELBO plus `losses`."""
    from pretrain.model.parallelize import build_model

    model_cfg = model_cfg or ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=128,
        make_vocab_size_divisible_by=16,
    )
    model = build_model(
        model_cfg, vocab_size=task.vocab_size, mask_token_id=task.mask_id, seed=seed
    )
    objective = build_objective(DiffusionConfig(), mask_id=task.mask_id)
    aux = AuxiliarySet(
        [AUXILIARIES[c.name](c, mask_id=task.mask_id) for c in losses],
        vocab_size=task.vocab_size,
        seed=seed,
    )
    aux.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(seed)
    forwards, t0 = 0.0, time.perf_counter()
    model.train()
    for step in range(steps):
        key = CorruptionKey(seed, step)
        batch = objective.prepare(task.sample(batch_size, data), key)
        loss, _ = objective.loss(model(batch.inputs, targets=batch.targets), batch)
        metrics: dict = {}
        loss = loss + aux(model, batch, key, metrics)
        forwards += metrics["aux/extra_forwards_per_step"].item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return TinyRun(
        model,
        ModelView(model, task.vocab_size),
        (time.perf_counter() - t0) / steps,
        forwards / steps,
    )
