"""The promotion gates: does a newly registered version earn the alias `staging`?

The segmentation model's gate (:func:`decide_segmenter_promotion`) asks for an out-of-fold mean
Dice of at least ``segment.gate.min_dice``. The classifier's gate (:func:`decide_promotion`)
judges the repeated estimate of the evaluate stage (mean test AUC over the repeated splits and
its corrected lower bound), not one test split, and the operating point: the mean
sensitivity and specificity at the model's own threshold. It compares with the current staging
version only when both were evaluated on the same data (the cohort's DVC hash, ``data_md5``);
otherwise it says so and judges the new version on the minimums alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """What the gate judges of one version: repeated means and the AUC's corrected lower bound."""

    auc_mean: float
    auc_lower_bound: float
    sensitivity: float
    specificity: float
    data_md5: str


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of the gate with the reason a person can read."""

    promote: bool
    reason: str
    compared_with_staging: bool


def _number(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide_promotion(
    new: Estimate,
    current: Estimate | None,
    *,
    min_auc: float,
    min_auc_lower_bound: float,
    min_sensitivity: float,
    min_specificity: float,
    tolerance: float,
) -> PromotionDecision:
    """Promote when every minimum is met and, for the same data, the mean AUC is not worse than
    the staging version's by more than ``tolerance``."""
    checks = [("mean test AUC", new.auc_mean, min_auc), ("its corrected lower bound", new.auc_lower_bound,
              min_auc_lower_bound), ("mean sensitivity", new.sensitivity, min_sensitivity),
              ("mean specificity", new.specificity, min_specificity)]
    failed = [f"{name} {value:.3f} < {minimum:.3f}" if _number(value) else f"{name} is not a number ({value})"
              for name, value, minimum in checks if not (_number(value) and value >= minimum)]
    if failed:
        return PromotionDecision(False, "held: " + "; ".join(failed), False)
    met = (f"mean test AUC {new.auc_mean:.3f} (lower bound {new.auc_lower_bound:.3f}), sensitivity "
           f"{new.sensitivity:.3f}, specificity {new.specificity:.3f} meet the minimums")
    if current is None:
        return PromotionDecision(True, f"{met}; no current staging version", False)
    if current.data_md5 != new.data_md5 or new.data_md5 in ("", "unknown"):
        return PromotionDecision(True, f"{met}; not compared with staging: it was evaluated on other data "
                                       f"(data_md5 {current.data_md5} vs {new.data_md5})", False)
    if not _number(current.auc_mean):
        return PromotionDecision(True, f"{met}; staging carries no repeated AUC to compare with", False)
    if new.auc_mean < current.auc_mean - tolerance:
        return PromotionDecision(False, f"held: mean test AUC {new.auc_mean:.3f} is worse than staging's "
                                        f"{current.auc_mean:.3f} by more than {tolerance:.3f} (same data)", True)
    return PromotionDecision(True, f"{met}; within {tolerance:.3f} of staging's {current.auc_mean:.3f} (same data)",
                             True)


def decide_segmenter_promotion(dice_mean: float | None, *, min_dice: float, n_cases: int) -> PromotionDecision:
    """Promote a segmentation model when its out-of-fold mean Dice over ``n_cases`` reaches ``min_dice``."""
    if not _number(dice_mean):
        return PromotionDecision(False, f"held: no out-of-fold mean Dice ({dice_mean}) to judge", False)
    if dice_mean < min_dice:
        return PromotionDecision(False, f"held: out-of-fold mean Dice {dice_mean:.3f} over {n_cases} cases "
                                        f"< {min_dice:.3f}", False)
    return PromotionDecision(True, f"out-of-fold mean Dice {dice_mean:.3f} over {n_cases} cases reaches "
                                   f"{min_dice:.3f}", False)
