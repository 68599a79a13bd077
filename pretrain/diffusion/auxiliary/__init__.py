"""Joint-consistency auxiliary losses (registry `AUXILIARIES`).

    self_correction         denoise drafts holding the model's own parallel samples
    energy_nce              sequence energy on the trunk, NCE against parallel samples
    multistep_consistency   one-step prediction distilled towards the model's n-step rollout

See docs/joint_consistency.md; the joint-consistency metric is `pretrain.evaluation`'s.
"""

from pretrain.diffusion.auxiliary.base import (
    WEIGHT_SCHEDULES,
    AuxiliaryLoss,
    AuxiliarySet,
    ModelView,
)
from pretrain.diffusion.auxiliary.registry import AUXILIARIES, build_auxiliaries

__all__ = [
    "AUXILIARIES",
    "WEIGHT_SCHEDULES",
    "AuxiliaryLoss",
    "AuxiliarySet",
    "ModelView",
    "build_auxiliaries",
]
