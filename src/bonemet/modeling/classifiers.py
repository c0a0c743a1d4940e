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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sklearn.base import ClassifierMixin

from bonemet.errors import UserError


class UnknownModelError(UserError, ValueError):
    """A model name not in :data:`CLASSIFIERS`, or a hyperparameter its builder does not take."""


def _pop_required(params: dict[str, Any], key: str, model: str) -> Any:
    if key not in params:
        raise UnknownModelError(
            f"{model}: hyperparameter '{key}' is needed (give it in train.fixed_params.{model} or "
            f"train.search_space.{model})"
        )
    return params.pop(key)


def _svm(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    p = dict(params)
    calibration_folds = int(_pop_required(p, "calibration_folds", "svm"))
    svc = SVC(random_state=seed, **p)
    folds = StratifiedKFold(n_splits=calibration_folds, shuffle=True, random_state=seed)
    return CalibratedClassifierCV(svc, method="sigmoid", cv=folds)


def _logreg(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(random_state=seed, **params)


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

    return XGBClassifier(random_state=seed, n_jobs=1, verbosity=0, **params)


def _lightgbm(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from lightgbm import LGBMClassifier

    return LGBMClassifier(random_state=seed, n_jobs=1, verbose=-1, **params)


def _mlp(params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    from sklearn.neural_network import MLPClassifier

    p = dict(params)
    n_layers = int(_pop_required(p, "n_layers", "mlp"))
    units = int(_pop_required(p, "hidden_units", "mlp"))
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


def build_classifier(name: str, params: Mapping[str, Any], seed: int) -> ClassifierMixin:
    """An unfitted classifier ``name`` (a key of :data:`CLASSIFIERS`) with ``params``; parameters
    not given take the library's own defaults (scikit-learn's, XGBoost's, LightGBM's)."""
    if name not in CLASSIFIERS:
        raise UnknownModelError(f"unknown model {name!r}; expected one of {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name](dict(params), int(seed))


#: Hyperparameters our builders take besides the estimator's own (``get_params``) keywords.
_EXTRA_HYPERPARAMETERS = {"svm": {"calibration_folds"}, "mlp": {"n_layers", "hidden_units"}}
#: Estimator keywords the builders set themselves (not a user's to choose).
_RESERVED = {"random_state", "n_jobs", "verbosity", "verbose", "hidden_layer_sizes"}


def hyperparameter_names(name: str) -> set[str]:
    """The hyperparameter names classifier ``name`` accepts in fixed params and search spaces."""
    if name == "svm":
        from sklearn.svm import SVC

        own = set(SVC().get_params(deep=False))
    else:
        probe = {"mlp": {"n_layers": 1, "hidden_units": 1}}.get(name, {})
        own = set(build_classifier(name, probe, 0).get_params(deep=False))
    return (own | _EXTRA_HYPERPARAMETERS.get(name, set())) - _RESERVED


def check_hyperparameters(name: str, keys: Iterable[str], where: str) -> None:
    """Raise :class:`UnknownModelError` naming ``where.<key>`` for any key ``name`` does not take."""
    import difflib

    valid = hyperparameter_names(name)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid: {', '.join(sorted(valid))}"
            raise UnknownModelError(f"{where}.{key}: {name} takes no hyperparameter '{key}'; {hint}")
