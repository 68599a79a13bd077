"""A synthetic task with a known joint constraint, for measuring the parallel-decoding gap.

Sequences of length L over K symbols and F filler tokens: position 0 is a fixed `<bos>` (the
decoding prompt: with RoPE alone a fully masked sequence gives the model no absolute position),
positions `a` and `b` carry the same symbol, drawn uniformly from K, and every other position is
an independent uniform filler. The
per-position marginals are uniform, so a perfect marginal-only model decoding both positions in
one step agrees with probability exactly 1/K; only a model (or decoder) that captures the joint
can do better. `train_tiny` trains a small `DLMTransformer` on it through the real masked
diffusion objective, optionally with auxiliary losses, in plain PyTorch (seconds on a CPU).
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
class PairTask:
    symbols: int = 8
    """K: the pair's symbol is uniform over ids 0..K-1."""
    fillers: int = 4
    """Filler ids K..K+F-1."""
    length: int = 8
    pair: tuple[int, int] = (1, 6)

    @property
    def bos_id(self) -> int:
        return self.symbols + self.fillers

    @property
    def mask_id(self) -> int:
        return self.bos_id + 1

    @property
    def vocab_size(self) -> int:
        return self.mask_id + 1

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n clean sequences [n, L]."""
        x = self.symbols + torch.randint(0, self.fillers, (n, self.length), generator=generator)
        symbol = torch.randint(0, self.symbols, (n,), generator=generator)
        x[:, self.pair[0]] = symbol
        x[:, self.pair[1]] = symbol
        x[:, 0] = self.bos_id
        return x

    def prompt(self, n: int) -> torch.Tensor:
        """The decoding prompt [n, 1]: `<bos>`; decode `length - 1` tokens after it."""
        return torch.full((n, 1), self.bos_id, dtype=torch.long)

    def agreement(self, x: torch.Tensor) -> float:
        """Fraction of sequences whose pair positions carry the same symbol."""
        a, b = x[:, self.pair[0]], x[:, self.pair[1]]
        return ((a == b) & (a < self.symbols)).float().mean().item()


@dataclass
class TinyRun:
    model: torch.nn.Module
    view: ModelView
    seconds_per_step: float
    extra_forwards_per_step: float


def train_tiny(
    task: PairTask,
    losses: list[AuxiliaryLossConfig],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    model_cfg: ModelConfig | None = None,
) -> TinyRun:
    """Train a small DLM on `task` with the masked-diffusion NELBO plus `losses` (needs the
    Megatron process groups of one process: `pretrain.parallel.runtime.init_runtime`)."""
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
