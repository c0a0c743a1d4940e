"""ICC filter: keep radiomic features that are reproducible under re-segmentation.

The study kept features whose intraclass correlation between automatic-mask and manual-mask
values was at least 0.9. :class:`ICCFilter` computes that ICC per feature on the training rows
only (it is a scikit-learn selector, so inside a ``Pipeline`` it never sees validation or test
rows) and keeps the reliable primary features.

Input layout
------------
* DataFrame (the train stage): the primary source's feature columns (automatic masks by default)
  plus the paired source's values of the same features in columns prefixed ``paired__``
  (``paired__original_shape_Elongation``, ...). ``transform`` drops every ``paired__`` column and
  also accepts frames that hold only the primary columns (serving: one mask's feature row).
* NumPy array (scikit-learn estimator checks, plain arrays): the pairing is by halves: the first
  half of the columns is the primary source, the second half the paired source in the same order.
  An odd number of columns cannot be paired and raises ``ValueError``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from bonemet.errors import UserError

ICC_FORMS = ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)")


class PairingError(UserError, ValueError):
    """The input cannot be split into primary and paired feature values."""


def icc(primary: np.ndarray, paired: np.ndarray, form: str) -> np.ndarray:
    """Single-rater ICC per column between two measurements of the same subjects.

    ``primary`` and ``paired`` are ``(n_subjects, n_features)``; column ``j`` of both holds one
    feature measured twice (two "raters": two masks). From the two-way ANOVA mean squares
    (Shrout & Fleiss 1979; McGraw & Wong 1996) with k = 2 raters and n subjects:

    * ``ICC(1,1)`` one-way random: ``(MSR - MSW) / (MSR + (k-1) MSW)``
    * ``ICC(2,1)`` two-way random, absolute agreement:
      ``(MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n)``
    * ``ICC(3,1)`` two-way mixed, consistency: ``(MSR - MSE) / (MSR + (k-1) MSE)``

    A feature with no variance at all (zero denominator) gets NaN. Unitless, in [-1, 1] for
    ICC(3,1) and typically so for the others.
    """
    if form not in ICC_FORMS:
        raise ValueError(f"icc_form must be one of {ICC_FORMS}, found {form!r}")
    a = np.asarray(primary, dtype=float)
    b = np.asarray(paired, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise PairingError(f"primary and paired must be 2-D of equal shape, found {a.shape} and {b.shape}")
    n, k = a.shape[0], 2
    if n < 2:
        raise ValueError(f"ICC needs at least 2 subjects (rows), found {n}")
    y = np.stack([a, b], axis=1)  # (n, k, p)
    grand = y.mean(axis=(0, 1))
    row_means = y.mean(axis=1)  # (n, p)
    col_means = y.mean(axis=0)  # (k, p)
    ss_total = ((y - grand) ** 2).sum(axis=(0, 1))
    ss_rows = k * ((row_means - grand) ** 2).sum(axis=0)
    ss_cols = n * ((col_means - grand) ** 2).sum(axis=0)
    ss_err = ss_total - ss_rows - ss_cols
    ms_rows = ss_rows / (n - 1)
    ms_cols = ss_cols / (k - 1)
    ms_err = ss_err / ((n - 1) * (k - 1))
    ms_within = (ss_cols + ss_err) / (n * (k - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        if form == "ICC(1,1)":
            num, den = ms_rows - ms_within, ms_rows + (k - 1) * ms_within
        elif form == "ICC(2,1)":
            num, den = ms_rows - ms_err, ms_rows + (k - 1) * ms_err + k * (ms_cols - ms_err) / n
        else:
            num, den = ms_rows - ms_err, ms_rows + (k - 1) * ms_err
        out = np.where(np.abs(den) > 0, num / den, np.nan)
    return out


class ICCFilter(SelectorMixin, BaseEstimator):
    """Keep primary features whose ICC with the paired measurement is >= ``threshold``.

    Parameters
    ----------
    threshold : float, default 0.9
        Minimum ICC to keep a feature (the study's 0.9).
    icc_form : {"ICC(2,1)", "ICC(3,1)", "ICC(1,1)"}, default "ICC(2,1)"
        Which single-rater ICC (see :func:`icc`).
    paired_prefix : str, default "paired__"
        Prefix of the paired source's columns in DataFrame input.
    min_features : int, default 1
        If fewer features pass the threshold, the ``min_features`` with the highest ICC are kept
        anyway (logged as a fallback in ``fallback_``) so the pipeline never runs out of features.

    Attributes
    ----------
    icc_ : pandas.Series
        ICC per primary feature (index: primary feature names), from the training rows
        (property over ``icc_values_``, an ndarray in the order of ``primary_names_``).
    primary_names_ : ndarray of str
        The primary feature names (``x0``.. for arrays: the first half).
    fallback_ : bool
        True when ``min_features`` overrode the threshold.
    """

    def __init__(self, *, threshold: float, icc_form: str, paired_prefix: str, min_features: int) -> None:
        self.threshold = threshold
        self.icc_form = icc_form
        self.paired_prefix = paired_prefix
        self.min_features = min_features

    # --- pairing -------------------------------------------------------------------------
    def _pair_indices(self, names: np.ndarray | None, n_features: int) -> tuple[np.ndarray, np.ndarray]:
        """Column indices of the primary features and of their paired columns."""
        if names is not None and any(str(n).startswith(self.paired_prefix) for n in names):
            pos = {str(n): i for i, n in enumerate(names)}
            primary = [i for i, n in enumerate(names) if not str(n).startswith(self.paired_prefix)]
            missing = [str(names[i]) for i in primary if self.paired_prefix + str(names[i]) not in pos]
            if missing:
                raise PairingError(
                    f"ICCFilter: {len(missing)} primary feature(s) lack a '{self.paired_prefix}' column, "
                    f"e.g. {missing[:3]}; expected one paired column per primary feature"
                )
            paired = [pos[self.paired_prefix + str(names[i])] for i in primary]
            return np.asarray(primary, dtype=int), np.asarray(paired, dtype=int)
        if n_features == 1:
            raise PairingError("ICCFilter needs paired columns; found n_features = 1 (expected an even number)")
        half = n_features // 2
        return np.arange(half), np.arange(half, 2 * half)

    def fit(self, X, y=None):
        """Compute the ICC of every primary feature on these (training) rows."""
        if self.icc_form not in ICC_FORMS:
            raise ValueError(f"icc_form must be one of {ICC_FORMS}, found {self.icc_form!r}")
        Xv = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        names = getattr(self, "feature_names_in_", None)
        primary, paired = self._pair_indices(names, Xv.shape[1])
        values = icc(Xv[:, primary], Xv[:, paired], self.icc_form)
        primary_names = names[primary] if names is not None else np.asarray([f"x{i}" for i in primary], dtype=object)
        self.primary_idx_ = primary
        self.primary_names_ = np.asarray(primary_names, dtype=object)
        self.icc_values_ = np.asarray(values, dtype=float)
        keep = np.nan_to_num(values, nan=-np.inf) >= self.threshold
        self.fallback_ = bool(keep.sum() < self.min_features)
        if self.fallback_:
            order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[: self.min_features]
            keep = np.zeros_like(keep)
            keep[order] = True
        mask = np.zeros(Xv.shape[1], dtype=bool)  # over all input columns, paired ones never kept
        mask[primary[keep]] = True
        self.support_ = mask
        return self

    @property
    def icc_(self) -> pd.Series:
        """ICC per primary feature (index: feature names), from the training rows.

        A property over the plain array ``icc_values_`` so fitted filters serialise with skops.
        """
        check_is_fitted(self, "icc_values_")
        return pd.Series(self.icc_values_, index=[str(n) for n in self.primary_names_], name=self.icc_form)

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_

    def transform(self, X):
        """Selected primary features; accepts frames with or without the ``paired__`` columns."""
        check_is_fitted(self, "support_")
        names = getattr(self, "feature_names_in_", None)
        if names is not None and isinstance(X, pd.DataFrame):
            cols = [str(c) for c in X.columns]
            if cols != [str(n) for n in names] and cols == [str(n) for n in self.primary_names_]:
                kept = [str(n) for n in names[self.support_]]
                return X.loc[:, kept].to_numpy(dtype=np.float64)
        return super().transform(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
