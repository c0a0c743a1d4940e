"""Classifier zoo, the leak-free pipeline and Optuna tuning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bonemet.modeling.classifiers import CLASSIFIERS, UnknownModelError, build_classifier
from bonemet.modeling.pipeline import build_pipeline
from bonemet.modeling.tuning import SearchSpaceError, precompute_folds, suggest, tune_model

SELECT = {"icc": {"threshold": 0.9}, "lasso": {"max_features": 5, "cv": 3}}


def _frame(n: int = 60, p: int = 12, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    y = (X[:, 0] - X[:, 1] + 0.5 * rng.normal(size=n) > 0).astype(int)
    noise = np.where(np.arange(p) < p // 2, 0.05, 2.0)
    cols = [f"f{i}" for i in range(p)]
    paired = pd.DataFrame(X + rng.normal(size=(n, p)) * noise, columns=[f"paired__{c}" for c in cols])
    return pd.concat([pd.DataFrame(X, columns=cols), paired], axis=1), y


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_each_classifier_fits_and_predicts_probabilities(name):
    rng = np.random.default_rng(1)
    X = pd.DataFrame(rng.normal(size=(40, 4)), columns=list("abcd"))
    y = (X["a"] > 0).astype(int).to_numpy()
    params = {"n_estimators": 20} if name in {"random_forest", "extra_trees", "xgboost", "lightgbm"} else {}
    clf = build_classifier(name, params, seed=0).fit(X, y)
    proba = clf.predict_proba(X)
    assert proba.shape == (40, 2)
    assert np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_unknown_model_is_refused():
    with pytest.raises(UnknownModelError, match="svm"):
        build_classifier("naive_bayes")


def test_pipeline_serves_primary_only_rows_and_never_keeps_paired_columns():
    X, y = _frame()
    pipe = build_pipeline("logreg", {}, SELECT, seed=0).fit(X, y)
    selected = list(pipe.named_steps["lasso"].get_feature_names_out())
    assert 1 <= len(selected) <= 5
    assert not any(s.startswith("paired__") for s in selected)
    primary = X[[c for c in X.columns if not c.startswith("paired__")]]
    np.testing.assert_allclose(pipe.predict_proba(X), pipe.predict_proba(primary))


def test_pipeline_fit_ignores_rows_it_is_not_given():
    X, y = _frame()
    train = np.arange(40)
    first = build_pipeline("svm", {"C": 1.0}, SELECT, seed=0).fit(X.iloc[train], y[train])
    altered = X.copy()
    altered.iloc[40:] = altered.iloc[40:] * 100 + 7  # the held-out rows change completely
    second = build_pipeline("svm", {"C": 1.0}, SELECT, seed=0).fit(altered.iloc[train], y[train])
    np.testing.assert_array_equal(first.named_steps["lasso"].coef_, second.named_steps["lasso"].coef_)
    np.testing.assert_allclose(first.predict_proba(X.iloc[40:]), second.predict_proba(X.iloc[40:]))


def test_pca_step_is_optional():
    X, y = _frame()
    pipe = build_pipeline("knn", {}, {**SELECT, "pca": {"enabled": True, "n_components": 3}}, seed=0)
    assert "pca" in pipe.named_steps
    assert "pca" not in build_pipeline("knn", {}, SELECT, seed=0).named_steps
    assert pipe.fit(X, y).predict_proba(X).shape == (60, 2)


def test_optional_pca_works_on_z_scores_not_on_raw_feature_scales():
    """Radiomic features differ by orders of magnitude (volumes vs ratios); PCA on raw values
    would return the largest-valued feature as its first component. Rescaling a feature must
    not change what the pipeline predicts."""
    X, y = _frame()
    select = {**SELECT, "pca": {"enabled": True, "n_components": 4}}
    first = build_pipeline("logreg", {}, select, seed=0).fit(X, y)
    rescaled = X.copy()
    for col in ("f3", "paired__f3"):  # a reproducible (ICC-passing) noise feature, a million times larger
        rescaled[col] = rescaled[col] * 1e6
    second = build_pipeline("logreg", {}, select, seed=0).fit(rescaled, y)
    np.testing.assert_allclose(first.predict_proba(X), second.predict_proba(rescaled), atol=1e-6)


def test_suggest_rejects_malformed_space():
    class FakeTrial:
        def suggest_float(self, name, low, high, log=False):
            return low

    with pytest.raises(SearchSpaceError, match="type"):
        suggest(FakeTrial(), {"C": {"type": "double", "low": 1, "high": 2}})


def test_tuning_two_trials_is_deterministic_and_uses_the_space():
    from sklearn.model_selection import StratifiedKFold

    X, y = _frame()
    splits = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    folds = precompute_folds(X, y, splits, SELECT, seed=0)
    assert all(not any(c.startswith("paired__") for c in f.X_train.columns) for f in folds)
    space = {"C": {"type": "float", "low": 0.5, "high": 10.0, "log": True},
             "l1_ratio": {"type": "float", "low": 0.0, "high": 1.0}}
    a = tune_model("logreg", folds, space, n_trials=2, seed=5)
    b = tune_model("logreg", folds, space, n_trials=2, seed=5)
    assert a.best_params == b.best_params and a.best_value == b.best_value
    assert a.n_trials == 2 and len(a.trials) == 2
    assert 0.5 <= a.best_params["C"] <= 10.0
    assert 0.5 < a.best_value <= 1.0
    untuned = tune_model("knn", folds, {}, n_trials=2, seed=5, fixed_params={"n_neighbors": 5})
    assert untuned.best_params == {"n_neighbors": 5} and untuned.n_trials == 0
