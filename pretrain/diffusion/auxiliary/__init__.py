"""Joint-consistency auxiliary losses (registry `AUXILIARIES`) and the joint-consistency metric.

    self_correction         denoise drafts holding the model's own parallel samples
    energy_nce              sequence energy on the trunk, NCE against parallel samples
    multistep_consistency   one-step prediction distilled towards the model's n-step rollout

See docs/joint_consistency.md.
"""

from pretrain.diffusion.auxiliary import energy_nce, multistep, self_correction  # noqa: F401
from pretrain.diffusion.auxiliary.base import (
    AUXILIARIES,
    WEIGHT_SCHEDULES,
    AuxiliaryLoss,
    AuxiliarySet,
    ModelView,
    build_auxiliaries,
    register_auxiliary,
)

__all__ = [
    "AUXILIARIES",
    "WEIGHT_SCHEDULES",
    "AuxiliaryLoss",
    "AuxiliarySet",
    "ModelView",
    "build_auxiliaries",
    "register_auxiliary",
]
