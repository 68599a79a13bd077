"""The auxiliary losses by name, and the set a config asks for."""

from __future__ import annotations

from pretrain.diffusion.auxiliary.base import WEIGHT_SCHEDULES, AuxiliaryLoss, AuxiliarySet
from pretrain.diffusion.auxiliary.energy_nce import EnergyNCE
from pretrain.diffusion.auxiliary.multistep import MultiStepConsistency
from pretrain.diffusion.auxiliary.self_correction import SelfCorrection
from pretrain.errors import ConfigError

AUXILIARIES: dict[str, type[AuxiliaryLoss]] = {
    cls.name: cls for cls in (SelfCorrection, EnergyNCE, MultiStepConsistency)
}


def build_auxiliaries(cfg, *, mask_id: int, vocab_size: int) -> AuxiliarySet | None:
    """The set configured in `cfg.auxiliary.losses` (None if empty). Which objectives they
    apply to is checked with the config (`pretrain.diffusion.registry.check_config`)."""
    if not cfg.auxiliary.losses:
        return None
    losses = []
    for i, item in enumerate(cfg.auxiliary.losses):
        where = f"auxiliary.losses[{i}]"
        if item.name not in AUXILIARIES:
            raise ConfigError(
                f"{where}.name: unknown auxiliary loss '{item.name}' "
                f"(expected one of: {', '.join(AUXILIARIES)})"
            )
        if item.schedule not in WEIGHT_SCHEDULES:
            raise ConfigError(
                f"{where}.schedule: unknown schedule '{item.schedule}' "
                f"(expected one of: {', '.join(WEIGHT_SCHEDULES)})"
            )
        losses.append(AUXILIARIES[item.name](item, mask_id=mask_id))
    if len({loss.name for loss in losses}) != len(losses):
        raise ConfigError("auxiliary.losses: each loss may appear once")
    return AuxiliarySet(losses, vocab_size=vocab_size, seed=cfg.train.seed)
