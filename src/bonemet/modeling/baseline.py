"""The plain baseline a user would try first, fitted beside the study's chain on the same splits.

A standardised, L1-penalised logistic regression on every feature of the primary source (no ICC,
no correlation filter, no LASSO step, no Optuna tuning, no calibration): ``C`` is chosen by the
inner cross-validation of the training cases only (``train.inner_folds`` stratified folds,
grouped by patient when the splits are), on a log grid of ``evaluate.baseline.n_cs`` values
between ``c_min`` and ``c_max``. The evaluate stage fits it on every repeat, so the registered
pipeline's paired difference to it (same test cases) gets the corrected resampled t interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import BaselineSpec


def baseline_pipeline(spec: BaselineSpec, cv: Sequence[tuple[np.ndarray, np.ndarray]], seed: int):
    """StandardScaler -> LogisticRegressionCV (L1, liblinear, AUC over ``cv``), unfitted."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cs = np.logspace(np.log10(spec.c_min), np.log10(spec.c_max), spec.n_cs)
    # l1_ratios (1.0,): the L1 penalty (scikit-learn >= 1.8 spells it so; `penalty` is deprecated)
    model = LogisticRegressionCV(Cs=cs, cv=list(cv), l1_ratios=(1.0,), solver="liblinear", scoring="roc_auc",
                                 max_iter=spec.max_iter, random_state=seed, use_legacy_attributes=False)
    return make_pipeline(StandardScaler(), model)


def baseline_scores(X_train: pd.DataFrame, y_train: np.ndarray, X_test: pd.DataFrame, *, spec: BaselineSpec,
                    inner_folds: int, seed: int, groups: Sequence[str] | None = None) -> np.ndarray:
    """The baseline fitted on the training cases (``C`` by their inner CV), scored on the test cases."""
    from bonemet.modeling.training import _inner_splits

    cv = _inner_splits(np.asarray(y_train), inner_folds, seed, groups)
    pipeline = baseline_pipeline(spec, cv, seed).fit(X_train.to_numpy(np.float64), np.asarray(y_train))
    return pipeline.predict_proba(X_test.to_numpy(np.float64))[:, 1]
