"""Calibrated probabilities and an operating point, both learnt inside the training data.

The ten-fold cross-validation of the training set (the study's Fig. 6 folds) gives every
training case an out-of-fold score from a pipeline that never saw it: selection and classifier
refitted on the other nine folds. Those scores, and only those, fit

* a calibrator (``train.calibration``): Platt's sigmoid (a logistic regression on the logit of
  the score) or isotonic regression, so that a calibrated 0.7 means about 70 % breast origin
  among cases scored so; and
* the threshold (``train.operating_point``), on the calibrated out-of-fold scores: Youden's J
  (the largest sensitivity + specificity - 1), the highest threshold that reaches a target
  sensitivity, or a fixed value.

The final pipeline (fitted on the whole training set) is wrapped with both in
:class:`CalibratedPipeline`, the fitted model the train stage saves, scores and registers; the
test set plays no part. This is scikit-learn's ``CalibratedClassifierCV(ensemble=False)`` with
the cross-validation the stage already runs, so no model is fitted twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import OperatingPointSpec

CALIBRATION_METHODS = ("sigmoid", "isotonic", "none")
_EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of probabilities clipped to [1e-6, 1 - 1e-6]: the sigmoid calibrator's input."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p / (1.0 - p))


class ScoreCalibrator(BaseEstimator):
    """Maps a classifier's probability of label 1 to a calibrated probability.

    Parameters:
        method: ``sigmoid`` (Platt: logistic regression on the score's logit), ``isotonic``
            (monotone step function, clipped to [0, 1]) or ``none`` (identity).
    """

    def __init__(self, *, method: str) -> None:
        self.method = method

    def fit(self, scores: np.ndarray, y: np.ndarray) -> ScoreCalibrator:
        scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=int)
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"method must be one of {CALIBRATION_METHODS}; found {self.method!r}")
        if self.method == "sigmoid":
            from sklearn.linear_model import LogisticRegression

            self.model_ = LogisticRegression(C=1e6, max_iter=1000).fit(logit(scores)[:, None], y)
        elif self.method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            self.model_ = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, y)
        else:
            self.model_ = None
        return self

    def transform(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if self.model_ is None:
            return scores
        if self.method == "sigmoid":
            return self.model_.predict_proba(logit(scores)[:, None])[:, 1]
        return np.asarray(self.model_.predict(scores), dtype=np.float64)


def choose_threshold(scores: np.ndarray, y: np.ndarray, spec: OperatingPointSpec) -> float:
    """The operating threshold from (calibrated, out-of-fold) training scores.

    ``youden``: the threshold maximising sensitivity + specificity - 1 (ties: the higher
    threshold); ``sensitivity``: the highest threshold whose sensitivity reaches
    ``spec.target_sensitivity``; ``fixed``: ``spec.fixed_threshold``. A case is positive when its
    score is at or above the threshold. Candidate thresholds are the scores themselves.
    """
    if spec.rule == "fixed":
        return float(spec.fixed_threshold)
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=int)
    candidates = np.unique(scores)[::-1]  # high to low: ties resolve to the higher threshold
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    best_t, best_j = float(candidates[0]), -np.inf
    for t in candidates:
        pred = scores >= t
        sens = float((pred & (y == 1)).sum()) / max(n_pos, 1)
        spec_ = float((~pred & (y == 0)).sum()) / max(n_neg, 1)
        if spec.rule == "sensitivity":
            if sens >= spec.target_sensitivity:
                return float(t)
            continue
        if sens + spec_ - 1.0 > best_j + 1e-12:
            best_t, best_j = float(t), sens + spec_ - 1.0
    if spec.rule == "sensitivity":
        return float(candidates[-1])
    return best_t


class CalibratedPipeline(ClassifierMixin, BaseEstimator):
    """A fitted pipeline with its calibrator and operating threshold (see the module docstring).

    ``predict_proba`` gives calibrated probabilities of (0, 1); ``predict`` the label at
    ``threshold``. Built fitted by the train stage; ``fit`` refits only the wrapped pipeline.
    """

    def __init__(self, *, pipeline: Any, calibrator: ScoreCalibrator, threshold: float) -> None:
        self.pipeline = pipeline
        self.calibrator = calibrator
        self.threshold = threshold

    def fit(self, X: Any, y: Any) -> CalibratedPipeline:  # pragma: no cover - the train stage builds it fitted
        self.pipeline.fit(X, y)
        return self

    @property
    def classes_(self) -> np.ndarray:
        return self.pipeline.classes_

    @property
    def named_steps(self) -> Any:
        """The wrapped pipeline's steps (selection summaries read them)."""
        return self.pipeline.named_steps

    def predict_proba(self, X: Any) -> np.ndarray:
        p = self.calibrator.transform(self.pipeline.predict_proba(X)[:, 1])
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Any) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= self.threshold).astype(int)
