"""Statistics behind the evaluation: DeLong AUC variance and test, Wilson and bootstrap intervals.

- DeLong: the fast midrank algorithm of Sun & Xu (2014), "Fast implementation of DeLong's
  algorithm for comparing the areas under correlated receiver operating characteristic curves",
  IEEE Signal Processing Letters 21(11):1389-1393. Complexity O(N log N) per score.
- Wilson: the score interval for a binomial proportion (Wilson 1927; Newcombe 1998, method 3).
- Bootstrap: stratified percentile bootstrap (cases resampled within each class, so every
  resample keeps the numbers of positives and negatives of the sample).

Labels are 0/1 with 1 the positive class (breast origin); scores are higher for the positive class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import norm, rankdata

from bonemet.errors import UserError

log = logging.getLogger(__name__)

AUC_CI_METHODS = ("normal", "logit")


class EvaluationInputError(UserError, ValueError):
    """Inputs to a metric are malformed (shapes, labels, alpha)."""


def _check_alpha(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise EvaluationInputError(f"alpha: expected a level in (0, 1), found {alpha!r}")
    return float(alpha)


def check_binary(
    y_true: Sequence[int] | np.ndarray, *others: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, ...]:
    """Return ``y_true`` as int 0/1 and ``others`` as float arrays of the same length.

    Raises EvaluationInputError when a label is not 0/1, lengths differ, or a score is not finite.
    """
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise EvaluationInputError(f"y_true: expected a 1-D array of 0/1 labels, found shape {y.shape}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise EvaluationInputError(
            f"y_true: expected labels 0/1, found {sorted(set(np.asarray(y)[bad].tolist()))[:5]}"
        )
    out: list[np.ndarray] = [y.astype(np.int64)]
    for i, arr in enumerate(others):
        a = np.asarray(arr, dtype=np.float64)
        if a.shape != y.shape:
            raise EvaluationInputError(
                f"argument {i + 1}: expected shape {y.shape} like y_true, found {a.shape}"
            )
        if not np.isfinite(a).all():
            raise EvaluationInputError(
                f"argument {i + 1}: expected finite scores, found {int((~np.isfinite(a)).sum())} NaN/inf"
            )
        out.append(a)
    return tuple(out)


# ----------------------------------------------------------------------------------------- DeLong
def _midrank(x: np.ndarray) -> np.ndarray:
    """Midranks (1-based; tied values get the mean of their ranks) of a 1-D array."""
    return rankdata(x, method="average")


def _structural_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components for ``scores`` of shape (k, N).

    Returns ``(aucs (k,), v10 (k, m), v01 (k, n))`` with m positives and n negatives:
    ``v10[r, i]`` is the fraction of negatives ranked below positive i (ties count 1/2),
    ``v01[r, j]`` the fraction of positives ranked above negative j.
    """
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    k = scores.shape[0]
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    aucs = np.empty(k)
    for r in range(k):
        tx = _midrank(pos[r])
        ty = _midrank(neg[r])
        tz = _midrank(np.concatenate([pos[r], neg[r]]))
        aucs[r] = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
        v10[r] = (tz[:m] - tx) / n
        v01[r] = 1.0 - (tz[m:] - ty) / m
    return aucs, v10, v01


def delong_covariance(
    y_true: Sequence[int] | np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix for k scores of the same cases.

    ``scores`` has shape (k, N). Returns ``(aucs (k,), cov (k, k))``. Both classes must be present
    with at least two cases each for a variance (one case of a class gives variance from the other
    class only, which DeLong defines with ddof=1 and so is NaN-free only from two).
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    (y,) = check_binary(y_true)
    if s.shape[1] != y.shape[0]:
        raise EvaluationInputError(f"scores: expected {y.shape[0]} columns like y_true, found {s.shape[1]}")
    m, n = int(y.sum()), int((1 - y).sum())
    if m == 0 or n == 0:
        raise EvaluationInputError(
            f"y_true: AUC needs both classes, found {m} positive and {n} negative cases"
        )
    aucs, v10, v01 = _structural_components(y, s)
    s10 = np.atleast_2d(np.cov(v10, ddof=1)) if m > 1 else np.zeros((s.shape[0], s.shape[0]))
    s01 = np.atleast_2d(np.cov(v01, ddof=1)) if n > 1 else np.zeros((s.shape[0], s.shape[0]))
    return aucs, s10 / m + s01 / n


def delong_auc(
    y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """ROC AUC and its DeLong variance (Sun & Xu 2014 fast midrank algorithm)."""
    y, s = check_binary(y_true, y_score)
    aucs, cov = delong_covariance(y, s[None, :])
    return float(aucs[0]), float(cov[0, 0])


def auc_ci_delong(
    y_true: Sequence[int] | np.ndarray,
    y_score: Sequence[float] | np.ndarray,
    alpha: float,
    method: str,
) -> tuple[float, float, float]:
    """AUC with a (1 - alpha) DeLong interval ``(auc, lo, hi)``.

    ``method="normal"``: auc +/- z * se, clipped to [0, 1] (what pROC's ``ci.auc`` reports, and the
    form of the study's intervals, e.g. 0.892-1.000). ``method="logit"``: the interval is built on
    logit(auc) with the delta-method se, se / (auc (1 - auc)), and mapped back; it stays inside (0, 1)
    and is less anti-conservative near 1, but is degenerate at AUC 0 or 1, where the normal form is used.
    """
    alpha = _check_alpha(alpha)
    if method not in AUC_CI_METHODS:
        raise EvaluationInputError(f"method: expected one of {AUC_CI_METHODS}, found {method!r}")
    auc, var = delong_auc(y_true, y_score)
    se = math.sqrt(max(var, 0.0))
    z = float(norm.ppf(1.0 - alpha / 2.0))
    if method == "logit" and 0.0 < auc < 1.0 and se > 0.0:
        lg = math.log(auc / (1.0 - auc))
        se_l = se / (auc * (1.0 - auc))
        lo, hi = 1.0 / (1.0 + math.exp(-(lg - z * se_l))), 1.0 / (1.0 + math.exp(-(lg + z * se_l)))
    else:
        lo, hi = auc - z * se, auc + z * se
    return auc, float(min(max(lo, 0.0), 1.0)), float(min(max(hi, 0.0), 1.0))


def delong_difference(
    y_true: Sequence[int] | np.ndarray,
    score_a: Sequence[float] | np.ndarray,
    score_b: Sequence[float] | np.ndarray,
    alpha: float,
) -> dict[str, float]:
    """Paired DeLong comparison of two scores of the same cases, with a CI of the AUC difference.

    Returns ``{auc_a, auc_b, diff (auc_a - auc_b), diff_lo, diff_hi, z, p}``: the (1 - alpha)
    normal interval ``diff +/- z_crit * se`` with the DeLong variance of the difference
    (var a + var b - 2 cov), the two-sided z test of ``diff = 0``. When that variance is 0
    (identical rankings) the AUCs cannot differ: z = 0, p = 1 and the interval is the point.
    """
    alpha = _check_alpha(alpha)
    y, a, b = check_binary(y_true, score_a, score_b)
    aucs, cov = delong_covariance(y, np.vstack([a, b]))
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    out = {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff}
    if var <= 1e-15:
        return {**out, "diff_lo": diff, "diff_hi": diff, "z": 0.0, "p": 1.0}
    se = math.sqrt(var)
    half = float(norm.ppf(1.0 - alpha / 2.0)) * se
    z = diff / se
    return {**out, "diff_lo": diff - half, "diff_hi": diff + half, "z": float(z),
            "p": min(float(2.0 * norm.sf(abs(z))), 1.0)}


def delong_test(
    y_true: Sequence[int] | np.ndarray,
    score_a: Sequence[float] | np.ndarray,
    score_b: Sequence[float] | np.ndarray,
) -> tuple[float, float, float, float]:
    """DeLong test of two correlated ROC curves on the same cases (two-sided).

    Returns ``(auc_a, auc_b, z, p)`` (see :func:`delong_difference`; z = 0, p = 1 when the
    variance of the difference is 0, e.g. identical rankings). A test has no interval: the
    interval level passed on below changes nothing returned.
    """
    d = delong_difference(y_true, score_a, score_b, alpha=0.05)
    return d["auc_a"], d["auc_b"], d["z"], d["p"]


def holm_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (family-wise error), same order as the input."""
    p = np.asarray(pvalues, dtype=np.float64)
    k = len(p)
    if k == 0:
        return p
    order = np.argsort(p, kind="mergesort")
    adj = np.empty(k)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[idx]))
        adj[idx] = running
    return adj


# ------------------------------------------------------------------------------------ proportions
def wilson_ci(k: int, n: int, alpha: float) -> tuple[float, float, float]:
    """Proportion k/n with its Wilson score interval ``(p, lo, hi)``; all NaN when n == 0."""
    alpha = _check_alpha(alpha)
    if n < 0 or k < 0 or k > n:
        raise EvaluationInputError(f"wilson_ci: expected 0 <= k <= n, found k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan, math.nan
    z = float(norm.ppf(1.0 - alpha / 2.0))
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)


# -------------------------------------------------------------------------------------- bootstrap
def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: Sequence[int] | np.ndarray,
    y_other: Sequence[float] | np.ndarray,
    n_boot: int,
    seed: int,
    alpha: float,
) -> tuple[float, float, float]:
    """Metric on the sample with a stratified percentile bootstrap interval ``(value, lo, hi)``.

    ``metric_fn(y_true, y_other)`` gets labels and predictions or scores. Cases are resampled with
    replacement within each class (class counts fixed), ``n_boot`` times, from
    ``numpy.random.default_rng(seed)``: the same seed gives the same interval. Resamples where the
    metric is undefined (NaN) are dropped; with none left, lo and hi are NaN.
    """
    alpha = _check_alpha(alpha)
    if n_boot < 1:
        raise EvaluationInputError(f"n_boot: expected >= 1, found {n_boot}")
    y, o = check_binary(y_true, y_other)
    value = float(metric_fn(y, o))
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(y == c) for c in (0, 1)]
    strata = [s for s in strata if len(s)]
    # all resample indices drawn up front, one (n_boot, class size) block per class
    idx_all = np.concatenate([s[rng.integers(0, len(s), size=(n_boot, len(s)))] for s in strata], axis=1)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        idx = idx_all[b]
        stats[b] = metric_fn(y[idx], o[idx])
    finite = stats[np.isfinite(stats)]
    if len(finite) == 0:
        return value, math.nan, math.nan
    if len(finite) < n_boot:
        log.debug("bootstrap: %d of %d resamples gave an undefined metric", n_boot - len(finite), n_boot)
    lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return value, float(lo), float(hi)


def corrected_resampled_t(
    values: Sequence[float] | np.ndarray, *, n_train: int, n_test: int, alpha: float,
    bounds: tuple[float, float] | None = None,
) -> dict[str, float]:
    """Mean of a statistic over repeated random train/test splits with the corrected resampled t
    interval of Nadeau & Bengio (2003), "Inference for the generalization error", Machine
    Learning 52:239-281, as WORC and the radiomics literature report it.

    The R repeats share training cases, so their spread understates the uncertainty; the
    correction inflates the variance of the mean from ``s^2 / R`` to
    ``(1 / R + n_test / n_train) s^2``, and the interval uses Student's t with R - 1 degrees of
    freedom. Also returned: the plain percentile range (``alpha/2`` and ``1 - alpha/2``
    quantiles of the values). Non-finite values (e.g. an AUC undefined on a one-class test set)
    are left out and counted in ``n_dropped``.

    ``bounds``: the statistic's range (e.g. (0, 1) for an AUC, (-1, 1) for a difference of two);
    the interval is clipped to it (with few repeats the t interval can reach past it).

    Returns ``{mean, sd, lo, hi, pct_lo, pct_hi, n, n_dropped}`` (``lo``/``hi`` NaN with fewer
    than two finite values).
    """
    from scipy.stats import t as student_t

    alpha = _check_alpha(alpha)
    if n_train < 1 or n_test < 1:
        raise EvaluationInputError(f"n_train and n_test must be >= 1, found {n_train} and {n_test}")
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    out = {"n": int(finite.size), "n_dropped": int(arr.size - finite.size)}
    if finite.size == 0:
        return {**out, "mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan,
                "pct_lo": math.nan, "pct_hi": math.nan}
    mean = float(finite.mean())
    pct_lo, pct_hi = (float(v) for v in np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0]))
    if finite.size < 2:
        return {**out, "mean": mean, "sd": math.nan, "lo": math.nan, "hi": math.nan, "pct_lo": pct_lo,
                "pct_hi": pct_hi}
    sd = float(finite.std(ddof=1))
    se = math.sqrt((1.0 / finite.size + n_test / n_train) * sd**2)
    half = float(student_t.ppf(1.0 - alpha / 2.0, df=finite.size - 1)) * se
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {**out, "mean": mean, "sd": sd, "lo": lo, "hi": hi, "pct_lo": pct_lo, "pct_hi": pct_hi}
