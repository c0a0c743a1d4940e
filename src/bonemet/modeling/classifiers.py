"""The classifier zoo: a table name -> builder, so a model is chosen by name from params.

Every builder takes the hyperparameters (from params or from Optuna) and a seed and returns an
unfitted scikit-learn-compatible classifier with ``predict_proba``. All run single-threaded
(``n_jobs=1``): the train stage is budgeted for 2 cores shared with other work.

* ``svm``: ``SVC`` wrapped in ``CalibratedClassifierCV`` (sigmoid/Platt, stratified inner folds)
  for probabilities: ``SVC(probability=True)`` is deprecated in scikit-learn 1.9.
* ``logreg``: ``LogisticRegression`` with ``l1_ratio`` (0 = ridge, 1 = lasso; saga solver)
  instead of the deprecated ``penalty=``.
* ``mlp``: ``MLPClassifier`` whose ``hidden_layer_sizes`` is built from ``n_layers`` and
  ``hidden_units`` (tuples cannot be Optuna categorical choices).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sklearn.base import ClassifierMixin


class UnknownModelError(ValueError):
    """A model name not in :data:`CLASSIFIERS`."""


def _svm(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    p = dict(params)
    calibration_folds = int(p.pop("calibration_folds", 3))
    svc = SVC(random_state=seed, **p)
    folds = StratifiedKFold(n_splits=calibration_folds, shuffle=True, random_state=seed)
    return CalibratedClassifierCV(svc, method="sigmoid", cv=folds)


def _logreg(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from sklearn.linear_model import LogisticRegression

    p = {"solver": "saga", "max_iter": 5000, "l1_ratio": 0.0, **params}
    return LogisticRegression(random_state=seed, **p)


def _knn(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_jobs=1, **params)


def _random_forest(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(random_state=seed, n_jobs=1, **params)


def _extra_trees(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from sklearn.ensemble import ExtraTreesClassifier

    return ExtraTreesClassifier(random_state=seed, n_jobs=1, **params)


def _xgboost(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from xgboost import XGBClassifier

    p = {"tree_method": "hist", "eval_metric": "logloss", **params}
    return XGBClassifier(random_state=seed, n_jobs=1, verbosity=0, **p)


def _lightgbm(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from lightgbm import LGBMClassifier

    return LGBMClassifier(random_state=seed, n_jobs=1, verbose=-1, **params)


def _mlp(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from sklearn.neural_network import MLPClassifier

    p = {"max_iter": 2000, **params}
    n_layers = int(p.pop("n_layers", 1))
    units = int(p.pop("hidden_units", 32))
    return MLPClassifier(hidden_layer_sizes=(units,) * n_layers, random_state=seed, **p)


CLASSIFIERS: dict[str, Callable[[Mapping[str, Any], int], ClassifierMixin]] = {
    "svm": _svm,
    "logreg": _logreg,
    "knn": _knn,
    "random_forest": _random_forest,
    "extra_trees": _extra_trees,
    "xgboost": _xgboost,
    "lightgbm": _lightgbm,
    "mlp": _mlp,
}

#: Display names for tables and figures.
DISPLAY_NAMES: dict[str, str] = {
    "svm": "SVM",
    "logreg": "Logistic regression",
    "knn": "KNN",
    "random_forest": "Random forest",
    "extra_trees": "Extra trees",
    "xgboost": "XGBoost",
    "lightgbm": "LightGBM",
    "mlp": "MLP",
}


def build_classifier(name: str, params: Mapping[str, Any] | None = None, seed: int = 0) -> ClassifierMixin:
    """An unfitted classifier ``name`` (a key of :data:`CLASSIFIERS`) with ``params``."""
    if name not in CLASSIFIERS:
        raise UnknownModelError(f"unknown model {name!r}; expected one of {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name](dict(params or {}), int(seed))
