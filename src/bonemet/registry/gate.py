"""The promotion gates: does a newly registered version earn the alias `staging`?

The segmentation model's gate (:func:`decide_segmenter_promotion`) asks for an out-of-fold mean
Dice of at least ``segment.gate.min_dice``. The classifier's gate (:func:`decide_promotion`)
judges the repeated estimate of the evaluate stage (mean test AUC over the repeated splits and
its corrected lower bound), not one test split, and the operating point: the mean
sensitivity and specificity at the model's own threshold, and how far the registered family's mean
AUC lies below the best family's (at most ``register.max_gap_to_best``; a held version's reason
names the families that would pass). It compares with the current staging
version only when both were evaluated on the same data (the cohort's DVC hash, ``data_md5``);
otherwise it says so and judges the new version on the minimums alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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


def _minimum_failures(est: Estimate, min_auc: float, min_auc_lower_bound: float, min_sensitivity: float,
                      min_specificity: float) -> list[str]:
    checks = [("mean test AUC", est.auc_mean, min_auc), ("its corrected lower bound", est.auc_lower_bound,
              min_auc_lower_bound), ("mean sensitivity", est.sensitivity, min_sensitivity),
              ("mean specificity", est.specificity, min_specificity)]
    return [f"{name} {value:.3f} < {minimum:.3f}" if _number(value) else f"{name} is not a number ({value})"
            for name, value, minimum in checks if not (_number(value) and value >= minimum)]


def best_family(families: Mapping[str, Estimate]) -> str | None:
    """The family with the highest mean repeated AUC (ties: the higher lower bound, then the order given)."""
    ranked = [(name, est) for name, est in families.items() if _number(est.auc_mean)]
    if not ranked:
        return None
    order = list(families)
    return min(ranked, key=lambda kv: (-kv[1].auc_mean, -(kv[1].auc_lower_bound if _number(kv[1].auc_lower_bound)
                                                           else -math.inf), order.index(kv[0])))[0]


def decide_promotion(
    new: Estimate,
    current: Estimate | None,
    *,
    min_auc: float,
    min_auc_lower_bound: float,
    min_sensitivity: float,
    min_specificity: float,
    tolerance: float,
    max_gap_to_best: float,
    model: str,
    families: Mapping[str, Estimate],
) -> PromotionDecision:
    """Promote when every minimum is met, the mean AUC of ``new`` (the registered family ``model``)
    is at most ``max_gap_to_best`` below the best of ``families`` (every family's repeated
    estimate), and, for the same data, the mean AUC is not worse than the staging version's by
    more than ``tolerance``. A held decision names the families that would pass the minimums and
    the gap (``register.model``)."""
    limits = (min_auc, min_auc_lower_bound, min_sensitivity, min_specificity)
    failed = _minimum_failures(new, *limits)
    best = best_family(families)
    gap_text = ""
    if best is not None and best != model:
        top = families[best].auc_mean
        if _number(new.auc_mean) and new.auc_mean < top - max_gap_to_best - 1e-12:
            failed.append(f"{model}'s mean test AUC {new.auc_mean:.3f} is {top - new.auc_mean:.3f} below {best}'s "
                          f"{top:.3f} (more than register.max_gap_to_best {max_gap_to_best:.3f})")
        elif _number(new.auc_mean):
            gap_text = f"; within {max_gap_to_best:.3f} of the best family {best} ({top:.3f})"
    elif best == model:
        gap_text = "; the best family by mean test AUC"
    if failed:
        passing = [name for name, est in sorted(families.items(), key=lambda kv: -kv[1].auc_mean
                                                 if _number(kv[1].auc_mean) else math.inf)
                   if name != model and not _minimum_failures(est, *limits) and best is not None
                   and est.auc_mean >= families[best].auc_mean - max_gap_to_best - 1e-12]
        would = (f"; would pass: {', '.join(passing)} (set register.model)" if passing
                 else "; no other family would pass" if families else "")
        return PromotionDecision(False, "held: " + "; ".join(failed) + would, False)
    met = (f"{model}: mean test AUC {new.auc_mean:.3f} (lower bound {new.auc_lower_bound:.3f}), sensitivity "
           f"{new.sensitivity:.3f}, specificity {new.specificity:.3f} meet the minimums{gap_text}")
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
