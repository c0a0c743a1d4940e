"""LASSO feature selector (the study's Fig. 4): cross-validated lambda, at most 20 features.

Choice for a binary label: LASSO *regression* on the 0/1 label, as the study did. Its lambda
is then on the scale of the study's (0.0391), so ``alpha=0.0391`` reproduces their fixed-lambda
setting; an L1 logistic model would put lambda on another scale. The selector only chooses
features; the classifiers downstream do the classification. Inputs should be standardised
(a ``StandardScaler`` precedes it in the pipeline) so the penalty treats features alike.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectorMixin
from sklearn.linear_model import Lasso, LassoCV, lasso_path
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.utils.validation import check_is_fitted, validate_data

log = logging.getLogger(__name__)

LAMBDA_RULES = ("min", "1se")


def _numeric_target(y) -> np.ndarray:
    """The target as float: numeric labels as they are, other labels as their sorted index."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        arr = arr.ravel()
    if arr.dtype.kind in "biuf":
        return arr.astype(float)
    _, inverse = np.unique(arr.astype(str), return_inverse=True)
    return inverse.astype(float)


class LassoSelector(SelectorMixin, BaseEstimator):
    """Keep the features with a nonzero LASSO coefficient (at most ``max_features``).

    Parameters
    ----------
    alpha : float or None, default None
        None: lambda chosen by ``cv``-fold cross-validation (``LassoCV``) on the fitting rows;
        a float fixes lambda (the study's optimum was 0.0391).
    cv : int, default 5
        Folds for the lambda search (stratified when the target has two classes).
    n_alphas : int, default 100
        Length of the lambda grid of the path.
    max_features : int, default 20
        At most this many features are kept, the largest by |coefficient|.
    max_iter : int, default 10000
        Coordinate-descent iterations.
    random_state : int or None
        Seeds the CV fold shuffle.
    lambda_rule : {"min", "1se"}, default "min"
        Which cross-validated lambda: "min" the one with the lowest mean CV error (scikit-learn's
        ``LassoCV``, glmnet's ``lambda.min``); "1se" the largest lambda whose mean CV error is
        within one standard error of that minimum (glmnet's ``lambda.1se``): a sparser model that
        the CV cannot tell apart from the best one. Ignored when ``alpha`` is fixed.

    If no coefficient survives at the chosen lambda, the selector walks down the lambda path to
    the first (largest) lambda with a nonzero coefficient and keeps those features (again at most
    ``max_features``); if even that yields none (e.g. a constant target), it keeps the single
    feature most correlated with the target. ``fallback_`` records when this happened.

    Attributes
    ----------
    alpha_ : float
        Lambda used.
    alpha_min_ : float
        The lambda of the lowest mean CV error (equals ``alpha_`` under the "min" rule or a fixed alpha).
    coef_ : ndarray
        LASSO coefficients at ``alpha_`` (standardised units when the input is standardised).
    alphas_, mse_path_ : ndarray
        The CV grid and the MSE per lambda and fold (only when ``alpha`` is None).
    coef_path_ : ndarray (n_features, n_alphas)
        Coefficients along ``alphas_`` for the coefficient-path figure.
    support_ : ndarray of bool
    fallback_ : bool
    n_iter_ : int
        Coordinate-descent iterations of the final fit.
    """

    def __init__(
        self,
        *,
        alpha: float | None,
        cv: int,
        n_alphas: int,
        max_features: int,
        max_iter: int,
        random_state: int | None,
        lambda_rule: str,
    ) -> None:
        self.alpha = alpha
        self.cv = cv
        self.n_alphas = n_alphas
        self.max_features = max_features
        self.max_iter = max_iter
        self.random_state = random_state
        self.lambda_rule = lambda_rule

    def _splitter(self, y: np.ndarray):
        values, counts = np.unique(y, return_counts=True)
        n_splits = int(min(self.cv, len(y)))
        if len(values) == 2 and counts.min() >= n_splits:
            return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)
        return KFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)

    def fit(self, X, y):
        """Fit LASSO on these rows (CV lambda unless fixed) and choose the kept features."""
        if self.max_features is not None and int(self.max_features) < 1:
            raise ValueError(f"LassoSelector max_features must be >= 1, found {self.max_features}")
        if self.alpha is not None and float(self.alpha) < 0:
            raise ValueError(f"LassoSelector alpha must be >= 0 or None, found {self.alpha}")
        if self.lambda_rule not in LAMBDA_RULES:
            raise ValueError(
                f"LassoSelector lambda_rule must be one of {', '.join(LAMBDA_RULES)}, found {self.lambda_rule!r}"
            )
        Xv, yv = validate_data(self, X, y, dtype=np.float64, y_numeric=False)
        yf = _numeric_target(yv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.alpha is None and len(yf) >= 2 * max(2, min(self.cv, len(yf))) and np.ptp(yf) > 0:
                model = LassoCV(
                    alphas=int(self.n_alphas),
                    cv=self._splitter(yf),
                    max_iter=self.max_iter,
                    random_state=self.random_state,
                )
                model.fit(Xv, yf)
                self.alphas_ = np.asarray(model.alphas_)
                self.mse_path_ = np.asarray(model.mse_path_)
                self.alpha_min_ = float(model.alpha_)
                self.alpha_ = self._chosen_alpha(self.alphas_, self.mse_path_, self.alpha_min_)
                coef = np.asarray(model.coef_)
                self.n_iter_ = int(model.n_iter_)
            else:
                self.alpha_ = float(self.alpha) if self.alpha is not None else 0.0
                coef, self.n_iter_ = np.zeros(Xv.shape[1]), 1
                if self.alpha_ > 0:
                    fixed = Lasso(alpha=self.alpha_, max_iter=self.max_iter).fit(Xv, yf)
                    coef, self.n_iter_ = fixed.coef_, max(1, int(fixed.n_iter_))
                self.alphas_ = None
                self.mse_path_ = None
                self.alpha_min_ = self.alpha_
            path_grid = self.alphas_ if self.alphas_ is not None else int(self.n_alphas)
            alphas, coef_path, _ = lasso_path(
                Xv - Xv.mean(axis=0), yf - yf.mean(), alphas=path_grid, max_iter=self.max_iter
            )
        self.coef_path_ = np.asarray(coef_path)
        if self.alpha_ != self.alpha_min_:  # the "1se" lambda: its coefficients are on the path already
            coef = self.coef_path_[:, int(np.flatnonzero(self.alphas_ == self.alpha_)[0])]
        if self.alphas_ is None:
            self.path_alphas_ = np.asarray(alphas)
        else:
            self.path_alphas_ = np.asarray(self.alphas_)
        self.fallback_ = False
        if not np.any(coef != 0):
            self.fallback_ = True
            nonzero_cols = [j for j in range(coef_path.shape[1]) if np.any(coef_path[:, j] != 0)]
            if nonzero_cols:
                j = nonzero_cols[0]
                coef = np.asarray(coef_path[:, j])
                log.info("LASSO kept no feature at lambda=%.4g; using lambda=%.4g from the path",
                            self.alpha_, alphas[j])
            else:
                centred = Xv - Xv.mean(axis=0)
                coef = np.zeros(Xv.shape[1])
                best = int(np.argmax(np.abs(centred.T @ (yf - yf.mean()))))
                coef[best] = 1e-12
                log.info("LASSO kept no feature on its whole path; keeping the feature most "
                            "correlated with the target")
        self.coef_ = np.asarray(coef, dtype=float)
        nonzero = np.flatnonzero(self.coef_ != 0)
        if self.max_features is not None and nonzero.size > int(self.max_features):
            order = nonzero[np.argsort(-np.abs(self.coef_[nonzero]), kind="stable")]
            nonzero = order[: int(self.max_features)]
        support = np.zeros(Xv.shape[1], dtype=bool)
        support[nonzero] = True
        self.support_ = support
        return self

    def _chosen_alpha(self, alphas: np.ndarray, mse_path: np.ndarray, alpha_min: float) -> float:
        """Lambda by ``lambda_rule`` from the CV grid (descending) and its per-fold MSE."""
        if self.lambda_rule == "min":
            return alpha_min
        mean = mse_path.mean(axis=1)
        best = int(np.argmin(mean))
        se = mse_path[best].std(ddof=1) / np.sqrt(mse_path.shape[1])
        within = np.flatnonzero(mean <= mean[best] + se)
        return float(alphas[within.min()])  # the grid descends: the lowest index is the largest lambda

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags
