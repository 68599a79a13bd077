"""The registry of training objectives: what each one is, where it lives, and what it needs.

Adding an objective is one new file with its class (see docs/design.md, "Adding an objective")
and one entry here. The entries are plain data, so the config can be checked against them
without importing torch (`dlm config show` stays fast), and nothing registers itself by being
imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from pretrain.errors import ConfigError


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    target: str
    """`module:Class` of the objective; imported only when the objective is built."""
    summary: str
    schedules: Literal["any", "shared_nelbo", "none"]
    """Noise schedules it takes: any, only the shared NELBO ones (one alpha(t) for every
    position: `linear`, `cosine`, `loglinear`), or none (nothing is noised)."""
    prefix_conditioning: bool
    """Whether it keeps random clean prefixes (`diffusion.prefix_probability`)."""
    auxiliary_losses: bool
    """Whether the joint-consistency auxiliary losses apply: they train the agreement of tokens
    committed in the same parallel decoding step, which an objective that decodes one token
    per step does not have."""

    def load(self) -> type:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


OBJECTIVES: dict[str, ObjectiveSpec] = {
    spec.name: spec
    for spec in (
        ObjectiveSpec(
            name="masked",
            target="pretrain.diffusion.objective:MaskedDiffusion",
            summary="masked-diffusion NELBO (LLaDA/MDLM)",
            schedules="any",
            prefix_conditioning=True,
            auxiliary_losses=True,
        ),
        ObjectiveSpec(
            name="block",
            target="pretrain.diffusion.block:BlockDiffusion",
            summary="block diffusion (BD3-LM): AR over blocks, diffusion within a block",
            schedules="shared_nelbo",
            prefix_conditioning=False,
            auxiliary_losses=True,
        ),
        ObjectiveSpec(
            name="ar",
            target="pretrain.diffusion.ar_adapt:CausalLM",
            summary="causal next-token LM (the AR baseline and start of AR -> DLM adaptation)",
            schedules="none",
            prefix_conditioning=False,
            auxiliary_losses=False,
        ),
        ObjectiveSpec(
            name="ar_adapt",
            target="pretrain.diffusion.ar_adapt:ARAdaptation",
            summary="AR -> DLM adaptation: one-token shift, causal -> bidirectional anneal",
            schedules="any",
            prefix_conditioning=True,
            auxiliary_losses=True,
        ),
    )
}

SHARED_NELBO_SCHEDULES = ("linear", "cosine", "loglinear")


def objective_spec(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise ConfigError(
            f"diffusion.objective: unknown objective '{name}' "
            f"(expected one of: {', '.join(OBJECTIVES)})"
        )
    return OBJECTIVES[name]


def check_config(cfg) -> None:
    """The diffusion settings of a `Config` against what its objective declares."""
    spec = objective_spec(cfg.diffusion.objective)
    if spec.schedules == "shared_nelbo" and cfg.diffusion.schedule not in SHARED_NELBO_SCHEDULES:
        raise ConfigError(
            f"diffusion.schedule: the {spec.name} objective needs a shared NELBO schedule "
            f"({', '.join(SHARED_NELBO_SCHEDULES)}), got '{cfg.diffusion.schedule}'"
        )
    if not spec.prefix_conditioning and cfg.diffusion.prefix_probability > 0:
        raise ConfigError(
            f"diffusion.prefix_probability: the {spec.name} objective keeps no clean prefixes "
            f"(got {cfg.diffusion.prefix_probability}; use 0)"
        )
    if cfg.auxiliary.losses and not spec.auxiliary_losses:
        raise ConfigError(
            f"auxiliary.losses: they train the agreement of tokens decoded in the same parallel "
            f"step; diffusion.objective '{spec.name}' decodes one token per step"
        )
