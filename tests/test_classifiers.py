"""Classifier zoo, the leak-free pipeline and Optuna tuning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bonemet.config import Choice, FloatRange, IntRange, ParamsError
from bonemet.modeling.classifiers import (
    CLASSIFIERS,
    UnknownModelError,
    build_classifier,
    check_hyperparameters,
)
from bonemet.modeling.pipeline import build_pipeline
from bonemet.modeling.tuning import precompute_folds, tune_model
from bonemet.search import suggest


@pytest.fixture(scope="module")
def select(params):
    """The project's selection settings with a smaller LASSO (5 features, 3 folds) for 60 rows."""
    return params.select.updated({"lasso.max_features": 5, "lasso.cv": 3})


def _fixed(params, name: str, **extra) -> dict:
    """The model's ``train.fixed_params`` from params.yaml plus ``extra``."""
    return {**params.train.fixed_params.get(name, {}), **extra}


def _frame(n: int = 60, p: int = 12, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    y = (X[:, 0] - X[:, 1] + 0.5 * rng.normal(size=n) > 0).astype(int)
    noise = np.where(np.arange(p) < p // 2, 0.05, 2.0)
    cols = [f"f{i}" for i in range(p)]
    paired = pd.DataFrame(X + rng.normal(size=(n, p)) * noise, columns=[f"paired__{c}" for c in cols])
    return pd.concat([pd.DataFrame(X, columns=cols), paired], axis=1), y


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_each_classifier_fits_and_predicts_probabilities(name, params):
    rng = np.random.default_rng(1)
    X = pd.DataFrame(rng.normal(size=(40, 4)), columns=list("abcd"))
    y = (X["a"] > 0).astype(int).to_numpy()
    extra = {"n_estimators": 20} if name in {"random_forest", "extra_trees", "xgboost", "lightgbm"} else {}
    if name == "mlp":  # tuned in params (search_space), so not among its fixed params
        extra = {"n_layers": 1, "hidden_units": 8}
    hyper = _fixed(params, name, **extra)
    check_hyperparameters(name, hyper, where=f"train.fixed_params.{name}")
    clf = build_classifier(name, hyper, seed=0).fit(X, y)
    proba = clf.predict_proba(X)
    assert proba.shape == (40, 2)
    assert np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_unknown_model_is_refused():
    with pytest.raises(UnknownModelError, match="svm"):
        build_classifier("naive_bayes", {}, seed=0)


@pytest.mark.parametrize(("name", "given", "needed"), [
    ("svm", {"C": 1.0}, "calibration_folds"),
    ("mlp", {"hidden_units": 8}, "n_layers"),
    ("mlp", {"n_layers": 1}, "hidden_units"),
])
def test_builders_add_no_defaults_of_their_own(name, given, needed):
    """A hyperparameter our builder needs and params.yaml does not give is an error naming it."""
    with pytest.raises(UnknownModelError, match=rf"{name}: hyperparameter '{needed}' is needed.*fixed_params\.{name}"):
        build_classifier(name, given, seed=0)


def test_unknown_hyperparameter_names_its_key_and_the_closest_valid_one(params):
    for name in CLASSIFIERS:  # what params.yaml gives is valid
        check_hyperparameters(name, params.train.fixed_params.get(name, {}), f"train.fixed_params.{name}")
        check_hyperparameters(name, params.train.search_space[name], f"train.search_space.{name}")
    with pytest.raises(UnknownModelError, match=r"train\.search_space\.svm\.gama: .*did you mean gamma\?"):
        check_hyperparameters("svm", ["C", "gama"], "train.search_space.svm")
    with pytest.raises(UnknownModelError, match="random_state"):  # set by the builder, not a user's choice
        check_hyperparameters("knn", ["random_state"], "train.fixed_params.knn")


def test_pipeline_serves_primary_only_rows_and_never_keeps_paired_columns(params, select):
    X, y = _frame()
    pipe = build_pipeline("logreg", _fixed(params, "logreg"), select, seed=0).fit(X, y)
    selected = list(pipe.named_steps["lasso"].get_feature_names_out())
    assert 1 <= len(selected) <= 5
    assert not any(s.startswith("paired__") for s in selected)
    primary = X[[c for c in X.columns if not c.startswith("paired__")]]
    np.testing.assert_allclose(pipe.predict_proba(X), pipe.predict_proba(primary))


def test_pipeline_fit_ignores_rows_it_is_not_given(params, select):
    X, y = _frame()
    train = np.arange(40)
    svm = _fixed(params, "svm", C=1.0)
    first = build_pipeline("svm", svm, select, seed=0).fit(X.iloc[train], y[train])
    altered = X.copy()
    altered.iloc[40:] = altered.iloc[40:] * 100 + 7  # the held-out rows change completely
    second = build_pipeline("svm", svm, select, seed=0).fit(altered.iloc[train], y[train])
    np.testing.assert_array_equal(first.named_steps["lasso"].coef_, second.named_steps["lasso"].coef_)
    np.testing.assert_allclose(first.predict_proba(X.iloc[40:]), second.predict_proba(X.iloc[40:]))


def test_pca_step_is_optional(select):
    X, y = _frame()
    assert not select.pca.enabled  # params.yaml: off
    pipe = build_pipeline("knn", {}, select.updated({"pca.enabled": True, "pca.n_components": 3}), seed=0)
    assert "pca" in pipe.named_steps and pipe.named_steps["pca"].n_components == 3
    assert "pca" not in build_pipeline("knn", {}, select, seed=0).named_steps
    assert pipe.fit(X, y).predict_proba(X).shape == (60, 2)


def test_optional_pca_works_on_z_scores_not_on_raw_feature_scales(params, select):
    """Radiomic features differ by orders of magnitude (volumes vs ratios); PCA on raw values
    would return the largest-valued feature as its first component. Rescaling a feature must
    not change what the pipeline predicts."""
    X, y = _frame()
    select = select.updated({"pca.enabled": True, "pca.n_components": 4})
    logreg = _fixed(params, "logreg")
    first = build_pipeline("logreg", logreg, select, seed=0).fit(X, y)
    rescaled = X.copy()
    for col in ("f3", "paired__f3"):  # a reproducible (ICC-passing) noise feature, a million times larger
        rescaled[col] = rescaled[col] * 1e6
    second = build_pipeline("logreg", logreg, select, seed=0).fit(rescaled, y)
    np.testing.assert_allclose(first.predict_proba(X), second.predict_proba(rescaled), atol=1e-6)


@pytest.mark.parametrize(("entry", "message"), [
    ({"type": "double", "low": 1, "high": 2, "log": False}, r"search_space\.svm\.C: .*'double'.*'float', 'int', 'categorical'"),
    ({"type": "float", "low": 1, "high": 2}, r"search_space\.svm\.C\.log: missing key"),
    ({"type": "float", "low": 2, "high": 1, "log": False}, r"search_space\.svm\.C: low must be below high"),
    ({"type": "categorical", "choices": []}, r"search_space\.svm\.C\.choices: .*at least 1 item"),
])
def test_malformed_search_space_is_a_params_error_naming_the_key(params, entry, message):
    """The search space is validated when params are loaded (no malformed space reaches Optuna)."""
    with pytest.raises(ParamsError, match=message):
        params.train.updated({"search_space.svm.C": entry})


def test_suggest_asks_the_trial_for_each_kind_with_its_settings():
    calls = []

    class FakeTrial:
        def suggest_float(self, name, low, high, log):
            calls.append(("float", name, low, high, log))
            return low

        def suggest_int(self, name, low, high, step, log):
            calls.append(("int", name, low, high, step, log))
            return high

        def suggest_categorical(self, name, choices):
            calls.append(("categorical", name, choices))
            return choices[-1]

    space = {"C": FloatRange(type="float", low=0.01, high=100.0, log=True),
             "k": IntRange(type="int", low=3, high=31, step=2, log=False),
             "w": Choice(type="categorical", choices=["uniform", "distance"])}
    assert suggest(FakeTrial(), space) == {"C": 0.01, "k": 31, "w": "distance"}
    assert calls == [("float", "C", 0.01, 100.0, True), ("int", "k", 3, 31, 2, False),
                     ("categorical", "w", ["uniform", "distance"])]


def test_tuning_two_trials_is_deterministic_and_uses_the_space(params, select):
    from sklearn.model_selection import StratifiedKFold

    X, y = _frame()
    splits = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    folds = precompute_folds(X, y, splits, select, seed=0)
    assert all(not any(c.startswith("paired__") for c in f.X_train.columns) for f in folds)
    space = params.train.updated({"search_space.logreg.C": {"type": "float", "low": 0.5, "high": 10.0, "log": True}}
                                 ).search_space["logreg"]
    assert set(space) == {"C", "l1_ratio"}
    tune = dict(fixed_params=_fixed(params, "logreg"), pruner_startup_trials=params.train.pruner_startup_trials,
                storage=None, workers=1)
    a = tune_model("logreg", folds, space, n_trials=2, seed=5, **tune)
    b = tune_model("logreg", folds, space, n_trials=2, seed=5, **tune)
    assert a.best_params == b.best_params and a.best_value == b.best_value
    assert a.n_trials == 2 and len(a.trials) == 2
    assert 0.5 <= a.best_params["C"] <= 10.0
    assert 0.5 < a.best_value <= 1.0
    assert {k: a.best_params[k] for k in tune["fixed_params"]} == tune["fixed_params"]  # fixed params kept
    untuned = tune_model("knn", folds, {}, n_trials=2, seed=5, fixed_params={"n_neighbors": 5},
                         pruner_startup_trials=params.train.pruner_startup_trials, storage=None, workers=1)
    assert untuned.best_params == {"n_neighbors": 5} and untuned.n_trials == 0
