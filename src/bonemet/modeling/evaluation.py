"""Binary classification metrics with stated confidence intervals (the study's Table 1, and more).

Each metric comes with ``<name>_lo``/``<name>_hi`` and the method of its interval in
``ci_method[<name>]``:

| metric | definition | interval |
|---|---|---|
| accuracy | (TP + TN) / N | Wilson |
| auc | area under the ROC curve | DeLong (normal, clipped to [0, 1], or logit) |
| sensitivity (recall) | TP / (TP + FN) | Wilson |
| specificity | TN / (TN + FP) | Wilson |
| precision (PPV) | TP / (TP + FP) | Wilson |
| npv | TN / (TN + FN) | Wilson |
| f1 | 2 TP / (2 TP + FP + FN) | stratified percentile bootstrap |
| brier | mean (score - label)^2 | stratified percentile bootstrap |

A metric that is undefined on the data (no positives, no predicted positives, one class only for
the AUC) is NaN with NaN bounds, never an exception; ``auc_defined`` says whether the AUC exists.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bonemet.modeling.stats import (
    EvaluationInputError,
    auc_ci_delong,
    bootstrap_ci,
    check_binary,
    delong_auc,
    delong_test,
    wilson_ci,
)

log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "EvaluationInputError",
    "auc_ci_delong",
    "binary_metrics",
    "bootstrap_ci",
    "brier_score",
    "confusion_counts",
    "cv_auc_summary",
    "delong_auc",
    "delong_test",
    "f1_from_labels",
    "wilson_ci",
]

#: Metric names in the order Table 1 shows them.
METRICS: tuple[str, ...] = (
    "accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "brier",
)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """TP, FP, TN, FN of 0/1 predictions against 0/1 labels."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    return {
        "tp": int(((y_pred == 1) & (y_true == 1)).sum()),
        "fp": int(((y_pred == 1) & (y_true == 0)).sum()),
        "tn": int(((y_pred == 0) & (y_true == 0)).sum()),
        "fn": int(((y_pred == 0) & (y_true == 1)).sum()),
    }


def f1_from_labels(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 of the positive class, 2 TP / (2 TP + FP + FN); NaN when TP + FP + FN == 0."""
    c = confusion_counts(y_true, y_pred)
    denom = 2 * c["tp"] + c["fp"] + c["fn"]
    return 2.0 * c["tp"] / denom if denom else math.nan


def brier_score(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Mean squared difference between the predicted probability and the 0/1 label (lower is better)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    return float(np.mean((np.asarray(y_score, dtype=np.float64) - y_true) ** 2)) if len(y_true) else math.nan


def binary_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_score: Sequence[float] | np.ndarray,
    threshold: float,
    *,
    alpha: float,
    n_boot: int,
    seed: int,
    auc_ci: str,
) -> dict[str, Any]:
    """All Table 1 metrics of probabilities ``y_score`` for labels ``y_true``, with intervals.

    A case is predicted positive when ``y_score >= threshold``. ``alpha`` sets the (1 - alpha)
    intervals; ``n_boot`` and ``seed`` drive the bootstrap (same seed, same result); ``auc_ci`` is
    the DeLong interval form ("normal" or "logit", see :func:`auc_ci_delong`).

    Returns a flat dict: for every name in :data:`METRICS` the value and ``<name>_lo``/``<name>_hi``;
    ``recall`` (= sensitivity); ``auc_var`` (DeLong variance); ``n``, ``n_pos``, ``n_neg``,
    ``threshold``, ``tp``, ``fp``, ``tn``, ``fn``; ``auc_defined`` (bool); ``alpha``;
    ``ci_method`` {metric: "delong-normal" | "delong-logit" | "wilson" | "bootstrap"}.
    """
    y, s = check_binary(y_true, y_score)
    if not 0.0 <= threshold <= 1.0:
        raise EvaluationInputError(f"threshold: expected a probability in [0, 1], found {threshold!r}")
    pred = (s >= threshold).astype(np.int64)
    c = confusion_counts(y, pred)
    n, n_pos = len(y), int(y.sum())
    n_neg = n - n_pos
    out: dict[str, Any] = {
        "n": n,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "threshold": float(threshold),
        "alpha": float(alpha),
        **c,
    }
    methods: dict[str, str] = {}

    def put(name: str, triple: tuple[float, float, float], method: str) -> None:
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = (float(v) for v in triple)
        methods[name] = method

    put("accuracy", wilson_ci(c["tp"] + c["tn"], n, alpha), "wilson")

    auc_defined = n_pos > 0 and n_neg > 0
    out["auc_defined"] = auc_defined
    if auc_defined:
        put("auc", auc_ci_delong(y, s, alpha=alpha, method=auc_ci), f"delong-{auc_ci}")
        out["auc_var"] = delong_auc(y, s)[1]
    else:
        log.warning("AUC undefined: %d positive and %d negative cases (needs both classes)", n_pos, n_neg)
        put("auc", (math.nan, math.nan, math.nan), f"delong-{auc_ci}")
        out["auc_var"] = math.nan

    put("sensitivity", wilson_ci(c["tp"], c["tp"] + c["fn"], alpha), "wilson")
    put("specificity", wilson_ci(c["tn"], c["tn"] + c["fp"], alpha), "wilson")
    put("precision", wilson_ci(c["tp"], c["tp"] + c["fp"], alpha), "wilson")
    put("npv", wilson_ci(c["tn"], c["tn"] + c["fn"], alpha), "wilson")
    put("f1", bootstrap_ci(f1_from_labels, y, pred, n_boot=n_boot, seed=seed, alpha=alpha), "bootstrap")
    put("brier", bootstrap_ci(brier_score, y, s, n_boot=n_boot, seed=seed, alpha=alpha), "bootstrap")
    for suffix in ("", "_lo", "_hi"):
        out[f"recall{suffix}"] = out[f"sensitivity{suffix}"]
    methods["recall"] = methods["sensitivity"]
    out["ci_method"] = methods
    return out


def cv_auc_summary(cv_aucs: dict[str, Sequence[float]]) -> dict[str, dict[str, float | int | None]]:
    """Per model: mean, sd (ddof=1), median, min, max and number of defined fold AUCs (DVC metrics).

    Folds whose AUC is undefined (NaN: one class in the fold) are left out and counted in ``n_undefined``;
    statistics of a model with no defined fold are None.
    """
    out: dict[str, dict[str, float | int | None]] = {}
    for model, aucs in cv_aucs.items():
        a = np.asarray(aucs, dtype=float)
        ok = a[np.isfinite(a)]
        stats: dict[str, float | int | None] = {"n_folds": int(len(ok)), "n_undefined": int(len(a) - len(ok))}
        if len(ok):
            stats.update(
                mean=float(ok.mean()),
                sd=float(ok.std(ddof=1)) if len(ok) > 1 else None,
                median=float(np.median(ok)),
                min=float(ok.min()),
                max=float(ok.max()),
            )
        else:
            stats.update(mean=None, sd=None, median=None, min=None, max=None)
        out[model] = stats
    return out
