"""Redundancy filter: drop features highly correlated with an earlier kept feature."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.utils.validation import check_is_fitted, validate_data


class CorrelationFilter(SelectorMixin, BaseEstimator):
    """Greedy redundancy filter on the training rows.

    Walks the features in column order and keeps a feature unless its absolute Pearson
    correlation with an already kept feature exceeds ``threshold``; of any such pair the later
    column is dropped. Constant columns have an undefined correlation, treated as 0 (kept here;
    the ICC filter and LASSO remove them).

    Parameters
    ----------
    threshold : float, default 0.95
        Absolute Pearson r above which the later feature of a pair is dropped (unitless, 0..1).

    Attributes
    ----------
    support_ : ndarray of bool
        Kept features.
    n_dropped_ : int
        Number of features dropped as redundant.
    """

    def __init__(self, *, threshold: float) -> None:
        self.threshold = threshold

    def fit(self, X, y=None):
        """Compute the correlation matrix on these rows and choose the kept columns."""
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"CorrelationFilter threshold must be in [0, 1], found {self.threshold}")
        Xv = validate_data(self, X, dtype=np.float64)
        p = Xv.shape[1]
        if Xv.shape[0] < 2:
            corr = np.zeros((p, p))
        else:
            centred = Xv - Xv.mean(axis=0)
            norm = np.sqrt((centred**2).sum(axis=0))
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(norm > 0, centred / norm, 0.0)
            corr = np.abs(z.T @ z)
        keep = np.zeros(p, dtype=bool)
        for j in range(p):
            kept = np.flatnonzero(keep)
            if kept.size == 0 or not np.any(corr[j, kept] > self.threshold):
                keep[j] = True
        self.support_ = keep
        self.n_dropped_ = int(p - keep.sum())
        return self

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_
