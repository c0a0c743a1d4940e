"""Selection transformers: ICC values, ICC/correlation/LASSO selection, scikit-learn estimator checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

import planned
from bonemet.selection import CorrelationFilter, ICCFilter, LassoSelector, PairingError, icc

#: params.yaml's ``select`` section: the transformers below are built from it (module level,
#: because ``parametrize_with_checks`` needs the estimators at collection time)
PARAMS = planned.load(Path(__file__).resolve().parents[1] / "params.yaml")
SELECT = PARAMS.select


def _icc_filter(**changes) -> ICCFilter:
    """An ICCFilter with params.yaml's ``select.icc`` settings, some changed."""
    spec = SELECT.icc
    kw = dict(threshold=spec.threshold, icc_form=spec.form, paired_prefix=spec.paired_prefix,
              min_features=spec.min_features)
    return ICCFilter(**{**kw, **changes})


def _correlation_filter(**changes) -> CorrelationFilter:
    return CorrelationFilter(**{"threshold": SELECT.correlation.threshold, **changes})


def _lasso(**changes) -> LassoSelector:
    """A LassoSelector with params.yaml's ``select.lasso`` settings (CV lambda), some changed."""
    spec = SELECT.lasso
    kw = dict(alpha=spec.alpha, cv=spec.cv, n_alphas=spec.n_alphas, max_features=spec.max_features,
              max_iter=spec.max_iter, random_state=None, lambda_rule=spec.lambda_rule)
    return LassoSelector(**{**kw, **changes})


def _paired_frame(n: int = 60, p: int = 40, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Primary features plus paired__ copies; even columns get little noise (reliable), odd ones a lot."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    noise = np.where(np.arange(p) % 2 == 0, 0.05, 2.0)
    paired = X + rng.normal(size=(n, p)) * noise
    cols = [f"f{i:02d}" for i in range(p)]
    frame = pd.concat(
        [pd.DataFrame(X, columns=cols), pd.DataFrame(paired, columns=[f"paired__{c}" for c in cols])], axis=1
    )
    y = (X[:, 0] + X[:, 2] + 0.3 * rng.normal(size=n) > 0).astype(int)
    return frame, y, noise


def _icc_by_loops(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Reference single-rater ICCs for one feature from explicit sums (Shrout & Fleiss 1979)."""
    data = [[float(x), float(z)] for x, z in zip(a, b, strict=True)]
    n, k = len(data), 2
    grand = sum(sum(r) for r in data) / (n * k)
    row_means = [sum(r) / k for r in data]
    col_means = [sum(r[j] for r in data) / n for j in range(k)]
    sst = sum((v - grand) ** 2 for r in data for v in r)
    ssr = k * sum((m - grand) ** 2 for m in row_means)
    ssc = n * sum((m - grand) ** 2 for m in col_means)
    sse = sst - ssr - ssc
    msr, msc, mse = ssr / (n - 1), ssc / (k - 1), sse / ((n - 1) * (k - 1))
    msw = (ssc + sse) / (n * (k - 1))
    return {
        "ICC(1,1)": (msr - msw) / (msr + (k - 1) * msw),
        "ICC(2,1)": (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n),
        "ICC(3,1)": (msr - mse) / (msr + (k - 1) * mse),
    }


def test_icc_hand_computed_example():
    # Rater 2 = rater 1 + 1: perfect consistency, imperfect absolute agreement.
    # By hand: MSR = 10/3, MSC = 2, MSE = 0, MSW = 1/2 ->
    # ICC(3,1) = 1, ICC(2,1) = (10/3) / (10/3 + 1) = 10/13, ICC(1,1) = (17/6) / (23/6) = 17/23.
    a = np.array([[1.0], [2.0], [3.0], [4.0]])
    b = a + 1.0
    assert icc(a, b, "ICC(3,1)")[0] == pytest.approx(1.0)
    assert icc(a, b, "ICC(2,1)")[0] == pytest.approx(10 / 13)
    assert icc(a, b, "ICC(1,1)")[0] == pytest.approx(17 / 23)


def test_icc_matches_loop_reference_on_random_data():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(25, 6))
    b = a * rng.uniform(0.5, 1.5, size=6) + rng.normal(size=(25, 6)) * rng.uniform(0.1, 2, size=6) + 0.3
    for form in ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)"):
        vectorised = icc(a, b, form)
        reference = [_icc_by_loops(a[:, j], b[:, j])[form] for j in range(6)]
        np.testing.assert_allclose(vectorised, reference, rtol=1e-10)


def test_icc_rejects_unknown_form_and_constant_feature_is_nan():
    a = np.ones((5, 1))
    assert np.isnan(icc(a, a, "ICC(2,1)")[0])
    with pytest.raises(ValueError, match="icc_form"):
        icc(a, a, "ICC(9,9)")


def test_icc_filter_keeps_reliable_and_drops_noisy_features():
    frame, y, noise = _paired_frame()
    filt = _icc_filter(threshold=0.9).fit(frame, y)
    kept = set(filt.get_feature_names_out())
    reliable = {f"f{i:02d}" for i in range(40) if noise[i] < 1}
    assert kept == reliable
    assert not any(name.startswith("paired__") for name in kept)
    assert filt.icc_.index.tolist() == [f"f{i:02d}" for i in range(40)]
    assert (filt.icc_[sorted(reliable)] > 0.99).all()


def test_icc_filter_uses_only_the_rows_it_is_fitted_on():
    frame, y, _ = _paired_frame()
    train = frame.iloc[:40]
    first = _icc_filter().fit(train, y[:40]).icc_
    altered = frame.copy()
    altered.iloc[40:] = 1e6  # the rows outside training
    second = _icc_filter().fit(altered.iloc[:40], y[:40]).icc_
    pd.testing.assert_series_equal(first, second)
    for form in ("ICC(2,1)", "ICC(3,1)"):  # the form is the filter's icc_form
        expected = icc(train.filter(regex="^f").to_numpy(), train.filter(regex="^paired__").to_numpy(), form)
        got = first if form == SELECT.icc.form else _icc_filter(icc_form=form).fit(train, y[:40]).icc_
        np.testing.assert_allclose(got.to_numpy(), expected)


def test_icc_filter_transform_serves_primary_only_rows():
    frame, y, _ = _paired_frame()
    filt = _icc_filter().set_output(transform="pandas").fit(frame, y)
    with_pairs = filt.transform(frame)
    primary_only = filt.transform(frame[[c for c in frame.columns if not c.startswith("paired__")]])
    pd.testing.assert_frame_equal(with_pairs, primary_only)
    assert list(with_pairs.columns) == list(filt.get_feature_names_out())


def test_icc_filter_missing_pair_and_min_features_fallback():
    frame, y, _ = _paired_frame(p=4)
    with pytest.raises(PairingError, match="paired__"):
        _icc_filter().fit(frame.drop(columns=["paired__f01"]), y)
    strict = _icc_filter(threshold=1.1, min_features=2).fit(frame, y)
    assert strict.fallback_ and strict.get_support().sum() == 2


def test_correlation_filter_drops_later_of_a_redundant_pair():
    rng = np.random.default_rng(1)
    a = rng.normal(size=50)
    X = pd.DataFrame({"a": a, "b": rng.normal(size=50), "a_copy": 2 * a + 0.01 * rng.normal(size=50)})
    filt = _correlation_filter(threshold=0.95).fit(X)
    assert list(filt.get_feature_names_out()) == ["a", "b"]
    assert filt.n_dropped_ == 1
    assert list(_correlation_filter(threshold=1.0).fit(X).get_feature_names_out()) == ["a", "b", "a_copy"]


def test_lasso_selector_cv_keeps_signal_and_at_most_max_features():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(120, 60))
    y = (X[:, 3] - X[:, 7] + 0.5 * rng.normal(size=120) > 0).astype(int)
    sel = _lasso(max_features=5, random_state=0).fit(X, y)
    support = np.flatnonzero(sel.get_support())
    assert 1 <= len(support) <= 5
    assert {3, 7} <= set(support)
    assert sel.alphas_ is not None and sel.mse_path_.shape[0] == len(sel.alphas_)
    assert sel.coef_path_.shape == (60, len(sel.alphas_))
    assert sel.alpha_ in set(sel.alphas_)


def test_lasso_selector_one_standard_error_rule_is_sparser_and_within_one_se():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(120, 60))
    y = (X[:, 3] - X[:, 7] + 0.3 * X[:, 11] + 0.8 * rng.normal(size=120) > 0).astype(int)
    at_min = _lasso(max_features=60, random_state=0, lambda_rule="min").fit(X, y)
    at_1se = _lasso(max_features=60, random_state=0, lambda_rule="1se").fit(X, y)
    assert at_min.alpha_ == at_min.alpha_min_
    assert at_1se.alpha_min_ == at_min.alpha_
    assert at_1se.alpha_ > at_1se.alpha_min_
    assert at_1se.get_support().sum() < at_min.get_support().sum()
    assert {3, 7} <= set(np.flatnonzero(at_1se.get_support()))
    mean = at_1se.mse_path_.mean(axis=1)
    best = int(np.argmin(mean))
    se = at_1se.mse_path_[best].std(ddof=1) / np.sqrt(at_1se.mse_path_.shape[1])
    chosen = int(np.flatnonzero(at_1se.alphas_ == at_1se.alpha_)[0])
    assert mean[chosen] <= mean[best] + se
    assert chosen == 0 or mean[chosen - 1] > mean[best] + se  # the largest such lambda
    with pytest.raises(ValueError, match="lambda_rule"):
        _lasso(lambda_rule="max").fit(X, y)


def test_lasso_selector_fixed_alpha_and_fallback():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(80, 30))
    y = (X[:, 0] > 0).astype(int)
    fixed = _lasso(alpha=0.0391).fit(X, y)
    assert fixed.alpha_ == pytest.approx(0.0391)
    assert fixed.alphas_ is None
    assert 0 in np.flatnonzero(fixed.get_support())
    huge = _lasso(alpha=1e6).fit(X, y)  # no coefficient survives: fall back along the path
    assert huge.fallback_ and huge.get_support().sum() >= 1
    assert huge.get_support()[0]
    with pytest.raises(ValueError, match="max_features"):
        _lasso(max_features=0).fit(X, y)


@parametrize_with_checks([_icc_filter(), _correlation_filter(), _lasso(random_state=0)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_scaler_choice_builds_the_named_transform_and_rejects_others(tmp_path):
    from scipy.stats import skew
    from sklearn.preprocessing import PowerTransformer, QuantileTransformer, StandardScaler

    from bonemet.modeling.persistence import load_pipeline, save_pipeline
    from bonemet.modeling.pipeline import build_pipeline, build_scaler

    rng = np.random.default_rng(0)
    heavy = rng.lognormal(sigma=1.0, size=(120, 1))
    assert isinstance(build_scaler("standard", 0), StandardScaler)
    z = build_scaler("standard", 0).fit_transform(heavy)
    yj = build_scaler("yeo-johnson", 0).fit_transform(heavy)
    q = build_scaler("quantile", 0).fit_transform(heavy)
    assert abs(skew(z[:, 0])) > 1.0  # a z-score keeps the tail
    assert abs(skew(yj[:, 0])) < 0.3 and abs(skew(q[:, 0])) < 0.3
    assert np.argsort(q[:, 0]).tolist() == np.argsort(heavy[:, 0]).tolist()  # monotone
    with pytest.raises(ValueError, match=r"select.scaler must be one of \['standard', 'yeo-johnson', 'quantile'\]"):
        build_scaler("robust", 0)

    n, p = 80, 6
    X = pd.DataFrame(rng.lognormal(size=(n, p)), columns=[f"f{i}" for i in range(p)])
    y = (np.log(X["f0"]) + 0.5 * rng.normal(size=n) > 0).astype(int).to_numpy()
    paired = X.add_prefix("paired__") * (1 + 0.01 * rng.normal(size=(n, p)))
    data = pd.concat([X, paired], axis=1)
    select = SELECT.updated({"icc.threshold": 0.5, "lasso.max_features": 3, "lasso.cv": 3, "scaler": "yeo-johnson"})
    logreg = dict(PARAMS.train.fixed_params["logreg"])
    pipe = build_pipeline("logreg", {**logreg, "C": 1.0}, select, seed=0).fit(data, y)
    assert isinstance(pipe.named_steps["scaler"], PowerTransformer)
    assert "f0" in pipe.named_steps["lasso"].get_feature_names_out()
    save_pipeline(pipe, tmp_path / "m.skops")
    again = load_pipeline(tmp_path / "m.skops")
    np.testing.assert_allclose(again.predict_proba(X)[:, 1], pipe.predict_proba(X)[:, 1])
    assert isinstance(build_pipeline("logreg", logreg, select.updated({"scaler": "quantile"}), 0).named_steps["scaler"],
                      QuantileTransformer)
    with pytest.raises(ValueError, match="scaler"):  # a spec cannot hold another scaler
        select.updated({"scaler": "robust"})
