"""The promotion gate: does a newly registered classifier version earn the alias `staging`?"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of the gate with the reason a person can read."""

    promote: bool
    reason: str
    new_auc: float
    current_auc: float | None


def decide_promotion(
    new_auc: float, current_auc: float | None, *, min_auc: float, tolerance: float
) -> PromotionDecision:
    """Promote when the new test AUC reaches ``min_auc`` and is not worse than the current
    ``staging`` version's by more than ``tolerance`` (no current version: the threshold alone).
    """
    if new_auc is None or not math.isfinite(new_auc):
        return PromotionDecision(False, f"new test AUC is not a number ({new_auc})", float("nan"), current_auc)
    if new_auc < min_auc:
        return PromotionDecision(
            False, f"test AUC {new_auc:.3f} is below the threshold {min_auc:.3f}", new_auc, current_auc
        )
    if current_auc is None or not math.isfinite(current_auc):
        return PromotionDecision(
            True, f"test AUC {new_auc:.3f} >= threshold {min_auc:.3f}; no current staging version", new_auc, None
        )
    if new_auc < current_auc - tolerance:
        return PromotionDecision(
            False,
            f"test AUC {new_auc:.3f} is worse than staging's {current_auc:.3f} by more than {tolerance:.3f}",
            new_auc,
            current_auc,
        )
    return PromotionDecision(
        True,
        f"test AUC {new_auc:.3f} >= threshold {min_auc:.3f} and within {tolerance:.3f} of staging's {current_auc:.3f}",
        new_auc,
        current_auc,
    )
