"""Planning (nnU-Net's first phase): the cohort's fingerprint, and the plan of every ``auto`` setting.

:func:`fingerprint_cohort` measures what the settings depend on (spacings, image sizes, lesion
sizes, HU percentiles in the lesions and in the bone region, the voxel class balance);
:func:`make_plan` turns it into the target spacing, the HU window, the network crop and the
batch size, within the segment profile's budgets; :func:`resolve_params` gives the stages a
:class:`~bonemet.config.Params` whose ``auto`` values are the plan's (explicit values win).
"""

from bonemet.planning.fingerprint import CaseFingerprint, CohortFingerprint, fingerprint_cohort
from bonemet.planning.plan import NonCTIntensityError, PlanError, PlanInputs, make_plan
from bonemet.planning.resolve import (
    PlanMismatchError,
    apply_values,
    planned_params,
    read_plan,
    resolve_params,
)

__all__ = [
    "CaseFingerprint",
    "CohortFingerprint",
    "NonCTIntensityError",
    "PlanError",
    "PlanInputs",
    "PlanMismatchError",
    "apply_values",
    "fingerprint_cohort",
    "make_plan",
    "planned_params",
    "read_plan",
    "resolve_params",
]
