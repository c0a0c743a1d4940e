"""Metrics and intervals: DeLong, Wilson, bootstrap, binary_metrics, Table 1."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bonemet.modeling.evaluation import (
    EvaluationInputError,
    auc_ci_delong,
    binary_metrics,
    bootstrap_ci,
    brier_score,
    cv_auc_summary,
    delong_auc,
    delong_test,
    f1_from_labels,
    wilson_ci,
)
from bonemet.modeling.stats import delong_difference, holm_adjust
from bonemet.modeling.table1 import (
    bayes_classifier_reference,
    build_table1,
    delong_comparison_table,
    table1_markdown,
    write_table1,
)

#: 95 % intervals, DeLong normal form: what the reference values below are for (and params.yaml's evaluate)
ALPHA = 0.05
BM = {"alpha": ALPHA, "auc_ci": "normal"}




@pytest.fixture(scope="module")
def ev(params):
    """params.yaml's ``evaluate`` section (alpha, auc_ci, decimals of Table 1)."""
    assert (params.evaluate.alpha, params.evaluate.auc_ci) == (ALPHA, "normal")
    return params.evaluate


def _sample(n: int, seed: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.45).astype(int)
    score = rng.normal(size=n) + shift * y
    return y, score


def _brute_force_delong_var(y: np.ndarray, s: np.ndarray) -> float:
    """DeLong variance from the O(m n) placement-value definition (DeLong et al. 1988)."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
    v10 = psi.mean(axis=1)
    v01 = psi.mean(axis=0)
    return v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)


# ----------------------------------------------------------------------------------------- DeLong
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_auc_equals_sklearn(seed):
    y, s = _sample(60, seed)
    s = np.round(s, 1)  # ties
    auc, _ = delong_auc(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_delong_variance_matches_brute_force_with_ties():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.9, 0.4, 0.2, 0.7, 0.55])
    auc, var = delong_auc(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s))
    assert var == pytest.approx(_brute_force_delong_var(y, s), rel=1e-12)
    assert var > 0


def test_delong_variance_close_to_bootstrap_variance():
    y, s = _sample(400, 7, shift=1.2)
    _, var = delong_auc(y, s)
    rng = np.random.default_rng(3)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boots = []
    for _ in range(400):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boots.append(roc_auc_score(y[idx], s[idx]))
    assert var == pytest.approx(np.var(boots, ddof=1), rel=0.25)


def test_auc_ci_contains_auc_and_is_clipped():
    y, s = _sample(80, 4, shift=1.0)
    auc, lo, hi = auc_ci_delong(y, s, ALPHA, "normal")
    assert lo < auc < hi
    assert auc_ci_delong(y, s, 0.01, "normal")[1] < lo  # 99 % is wider
    auc_l, lo_l, hi_l = auc_ci_delong(y, s, ALPHA, method="logit")
    assert auc_l == auc and lo_l < auc < hi_l and hi_l < 1
    # perfect separation: variance 0, interval collapses to [1, 1] and stays in [0, 1]
    yy = np.array([0, 0, 0, 1, 1, 1])
    assert auc_ci_delong(yy, np.arange(6.0), ALPHA, "normal") == (1.0, 1.0, 1.0)
    # wide interval near 1 is clipped
    y2 = np.array([0, 1, 0, 1, 1])
    _, _, hi2 = auc_ci_delong(y2, np.array([0.1, 0.9, 0.6, 0.5, 0.8]), ALPHA, "normal")
    assert hi2 <= 1.0
    with pytest.raises(EvaluationInputError):
        auc_ci_delong(y, s, ALPHA, method="exact")


def test_delong_test_identical_scores_and_known_difference():
    y, s = _sample(100, 5)
    a, b, z, p = delong_test(y, s, s)
    assert a == b and z == 0.0 and p == 1.0
    # a strictly monotone transform keeps the ranking: same AUC, no difference
    assert delong_test(y, s, np.exp(s))[3] == 1.0
    # informative vs pure noise on 300 cases: clearly different
    y, s = _sample(300, 6, shift=2.0)
    noise = np.random.default_rng(9).normal(size=300)
    a, b, z, p = delong_test(y, s, noise)
    assert a > b and z > 3 and p < 1e-3
    # antisymmetric
    _, _, z2, p2 = delong_test(y, noise, s)
    assert z2 == pytest.approx(-z) and p2 == pytest.approx(p)


def test_delong_test_pvalues_under_null_are_not_extreme():
    """Two equally informative, independent scores: p-values spread over (0, 1), few below 0.05."""
    ps = []
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        y = (rng.random(120) < 0.5).astype(int)
        ps.append(delong_test(y, rng.normal(size=120) + y, rng.normal(size=120) + y)[3])
    ps = np.asarray(ps)
    assert 0.3 < np.median(ps) < 0.7
    assert (ps < 0.05).mean() <= 0.15


def test_delong_difference_interval_agrees_with_the_test():
    """The CI of the AUC difference excludes 0 exactly when the two-sided p is below alpha."""
    y, s = _sample(80, 11, shift=1.0)
    d = delong_difference(y, s, s, alpha=ALPHA)
    assert d["diff"] == d["diff_lo"] == d["diff_hi"] == 0.0 and d["p"] == 1.0
    for seed in range(12):
        rng = np.random.default_rng(200 + seed)
        a, b = rng.normal(size=80) + y * 1.5, rng.normal(size=80) + y * rng.uniform(0.0, 1.5)
        d = delong_difference(y, a, b, alpha=0.1)
        auc_a, auc_b, z, p = delong_test(y, a, b)
        assert (d["auc_a"], d["auc_b"], d["z"], d["p"]) == (auc_a, auc_b, z, p)
        assert d["diff"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
        assert d["diff_lo"] < d["diff"] < d["diff_hi"]
        assert (d["diff_lo"] > 0 or d["diff_hi"] < 0) == (d["p"] < 0.1)
        wide = delong_difference(y, a, b, alpha=0.01)
        assert wide["diff_lo"] < d["diff_lo"] and wide["diff_hi"] > d["diff_hi"]


def test_delong_single_class_raises():
    with pytest.raises(EvaluationInputError, match="both classes"):
        delong_auc([1, 1, 1], [0.2, 0.3, 0.4])


def test_holm_adjust():
    assert holm_adjust([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])


# ------------------------------------------------------------------------------------------ Wilson
@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    # Newcombe (1998), Stat Med 17:857-872, Table I, method 3 (Wilson score, no continuity correction)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe(k, n, lo, hi):
    p, lo_, hi_ = wilson_ci(k, n, 0.05)
    assert p == pytest.approx(k / n)
    assert lo_ == pytest.approx(lo, abs=5e-5) and hi_ == pytest.approx(hi, abs=5e-5)


def test_wilson_edge_cases():
    assert all(math.isnan(v) for v in wilson_ci(0, 0, ALPHA))
    p, lo, hi = wilson_ci(20, 20, ALPHA)
    assert p == 1.0 and hi == 1.0 and lo < 1.0
    with pytest.raises(EvaluationInputError):
        wilson_ci(5, 3, ALPHA)
    with pytest.raises(EvaluationInputError):
        wilson_ci(1, 3, alpha=1.5)


# --------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_deterministic_and_seed_sensitive():
    y, s = _sample(50, 8)
    pred = (s > 0.5).astype(int)
    a = bootstrap_ci(f1_from_labels, y, pred, n_boot=300, seed=11, alpha=ALPHA)
    b = bootstrap_ci(f1_from_labels, y, pred, n_boot=300, seed=11, alpha=ALPHA)
    c = bootstrap_ci(f1_from_labels, y, pred, n_boot=300, seed=12, alpha=ALPHA)
    assert a == b
    assert a != c
    assert a[1] <= a[0] <= a[2]


def test_bootstrap_stratified_keeps_class_counts():
    y = np.array([0] * 7 + [1] * 3)
    seen = []
    bootstrap_ci(lambda yt, _o: seen.append(int(yt.sum())) or 0.0, y, np.zeros(10), n_boot=50, seed=0, alpha=ALPHA)
    assert set(seen) == {3}


def test_bootstrap_all_undefined_gives_nan_bounds():
    y = np.zeros(6, dtype=int)
    v, lo, hi = bootstrap_ci(f1_from_labels, y, np.zeros(6), n_boot=20, seed=0, alpha=ALPHA)
    assert math.isnan(v) and math.isnan(lo) and math.isnan(hi)


# ---------------------------------------------------------------------------------- binary_metrics
def test_binary_metrics_hand_example():
    # labels        1    1    1    1    0    0    0    0    0    0
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.1, 0.05])
    m = binary_metrics(y, s, 0.5, n_boot=200, seed=1, **BM)
    # predicted positive: 0.9 0.8 0.6 (TP=3), 0.7 (FP=1); FN=1 (0.3); TN=5
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 5, 1)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (10, 4, 6)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(0.75) and m["recall"] == m["sensitivity"]
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(0.75)
    assert m["npv"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["brier"] == pytest.approx(brier_score(y, s))
    assert m["brier"] == pytest.approx(np.mean((s - y) ** 2))
    assert m["ci_method"] == {
        "accuracy": "wilson",
        "auc": "delong-normal",
        "sensitivity": "wilson",
        "specificity": "wilson",
        "precision": "wilson",
        "npv": "wilson",
        "f1": "bootstrap",
        "brier": "bootstrap",
        "recall": "wilson",
    }
    for name in ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1", "brier"):
        assert m[f"{name}_lo"] <= m[name] <= m[f"{name}_hi"], name
    assert m == binary_metrics(y, s, 0.5, n_boot=200, seed=1, **BM)


def test_binary_metrics_edge_cases_do_not_crash():
    # one class only: AUC undefined, flagged
    m = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5, n_boot=20, seed=0, **BM)
    assert m["auc_defined"] is False and math.isnan(m["auc"]) and math.isnan(m["specificity"])
    # no predicted positives: precision NaN, F1 = 0
    m = binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], 0.5, n_boot=20, seed=0, **BM)
    assert math.isnan(m["precision"]) and m["f1"] == 0.0 and m["sensitivity"] == 0.0
    with pytest.raises(EvaluationInputError):
        binary_metrics([0, 2], [0.1, 0.2], 0.5, n_boot=20, seed=0, **BM)
    with pytest.raises(EvaluationInputError):
        binary_metrics([0, 1], [0.1, np.nan], 0.5, n_boot=20, seed=0, **BM)
    with pytest.raises(EvaluationInputError):
        binary_metrics([0, 1, 1], [0.1, 0.2], 0.5, n_boot=20, seed=0, **BM)


# ------------------------------------------------------------------------------------------ Table 1
def _results(ev, seed: int = 0) -> dict:
    """binary_metrics of three models with params.yaml's evaluate settings (100 resamples)."""
    kw = dict(alpha=ev.alpha, n_boot=100, seed=seed, auc_ci=ev.auc_ci)
    out = {}
    for i, model in enumerate(["svm", "logistic_regression", "knn"]):
        y, s = _sample(40, seed + i, shift=1.0 + i)
        p = 1 / (1 + np.exp(-s))
        out[model] = {
            "train": binary_metrics(y, p, 0.5, **kw),
            "test": binary_metrics(y[:20], p[:20], 0.5, **kw),
        }
    return out


def test_build_table1_shape_and_order(ev):
    df = build_table1(_results(ev), bayes_auc=0.95, best_model="knn")
    assert df.shape[0] == 6
    assert list(df[["model", "set"]].itertuples(index=False, name=None))[:2] == [
        ("svm", "train"),
        ("svm", "test"),
    ]
    for col in ("accuracy", "accuracy_lo", "accuracy_hi", "auc", "auc_lo", "auc_hi", "f1", "brier"):
        assert col in df.columns
    test_rows = df[df["set"] == "test"]
    assert np.allclose(test_rows["gap_to_bayes_auc"], 0.95 - test_rows["auc"])


def test_write_table1_json_markdown(tmp_path, ev):
    res = _results(ev)
    fmt = dict(decimals=ev.decimals, alpha=ev.alpha)
    # an undefined metric must become null, not NaN
    res["svm"]["test"]["precision"] = math.nan
    df = build_table1(res, bayes_auc=0.9, best_model="knn")
    j, md = tmp_path / "table1.json", tmp_path / "table1.md"
    write_table1(df, j, md, bayes_auc=0.9, best_model="knn", **fmt)
    text = j.read_text()
    assert "NaN" not in text
    doc = json.loads(text)
    assert set(doc["models"]) == {"svm", "logistic_regression", "knn"}
    assert doc["models"]["svm"]["test"]["precision"] is None
    assert isinstance(doc["models"]["knn"]["test"]["auc_lo"], float)
    assert doc["bayes_optimal"]["auc"] == 0.9
    assert doc["bayes_optimal"]["best_test_auc_gap"] == pytest.approx(
        0.9 - res["knn"]["test"]["auc"], abs=1e-6
    )
    m = md.read_text()
    for model in res:
        assert model in m
    assert "| train |" in m and "| test |" in m
    assert "DeLong" in m and "Wilson" in m and "bootstrap" in m
    assert "Bayes-optimal" in m and "knn" in m
    # deterministic: same inputs, same bytes
    j2, md2 = tmp_path / "b.json", tmp_path / "b.md"
    write_table1(
        build_table1(_results(ev), bayes_auc=0.9, best_model="knn"), j2, md2, bayes_auc=0.9, best_model="knn",
        **fmt,
    )
    res2 = _results(ev)
    res2["svm"]["test"]["precision"] = math.nan
    write_table1(
        build_table1(res2, bayes_auc=0.9, best_model="knn"), j2, md2, bayes_auc=0.9, best_model="knn", **fmt
    )
    assert j2.read_bytes() == j.read_bytes() and md2.read_bytes() == md.read_bytes()


def test_bayes_classifier_reference_in_table1(tmp_path, ev):
    y, llr = _sample(60, 4, shift=2.0)
    model = llr + np.random.default_rng(5).normal(scale=1.5, size=60)  # a noisier view of the same signal
    ref = bayes_classifier_reference(y, model, llr, alpha=ev.alpha, auc_ci=ev.auc_ci)
    assert ref["n"] == 60
    assert ref["llr_auc"] == pytest.approx(roc_auc_score(y, llr))
    assert ref["llr_auc_lo"] < ref["llr_auc"] < ref["llr_auc_hi"]
    assert ref["model_minus_llr"] == pytest.approx(roc_auc_score(y, model) - roc_auc_score(y, llr))
    assert ref["model_minus_llr"] < 0 and 0 < ref["p"] < 1
    df = build_table1(_results(ev), bayes_auc=0.9, best_model="knn", bayes_reference=ref)
    j, md = tmp_path / "t.json", tmp_path / "t.md"
    write_table1(df, j, md, decimals=ev.decimals, alpha=ev.alpha)
    doc = json.loads(j.read_text())["bayes_optimal"]
    assert doc["auc"] == 0.9
    assert doc["test_set_latent_llr"]["n"] == 60
    assert doc["test_set_latent_llr"]["llr_auc"] == pytest.approx(ref["llr_auc"], abs=1e-6)
    text = md.read_text()
    assert "On these 60 test cases the Bayes classifier itself" in text
    assert f"{ref['llr_auc']:.3f}" in text and f"{ref['model_minus_llr']:+.3f}" in text
    # without a reference the footnote and the JSON block are absent
    plain = build_table1(_results(ev), bayes_auc=0.9, best_model="knn")
    write_table1(plain, j, md, decimals=ev.decimals, alpha=ev.alpha)
    assert "test_set_latent_llr" not in j.read_text()
    assert "Bayes classifier itself" not in md.read_text()


def test_table1_markdown_without_bayes(ev):
    df = build_table1(_results(ev), bayes_auc=None, best_model=None)
    text = table1_markdown(df, decimals=ev.decimals, alpha=ev.alpha)
    assert "Bayes" not in text and text.count("\n| svm |") == 2
    auc = df.loc[(df["model"] == "svm") & (df["set"] == "test"), "auc"].item()
    assert f"{auc:.3f}" in text and f"{auc:.1f} (" in table1_markdown(df, decimals=1, alpha=ev.alpha)


def test_delong_comparison_table():
    y, s = _sample(120, 3, shift=1.5)
    noise = np.random.default_rng(0).normal(size=120)
    df = delong_comparison_table(y, {"good": s, "noise": noise, "same": s.copy()}, best="good")
    assert isinstance(df, pd.DataFrame)
    assert list(df["other"]) == ["noise", "same"]
    row = df.set_index("other")
    assert row.loc["same", "p"] == 1.0 and row.loc["same", "z"] == 0.0
    assert row.loc["noise", "p"] < 0.01 and row.loc["noise", "auc_best"] > row.loc["noise", "auc_other"]
    assert (df["p_holm"] >= df["p"]).all()
    with pytest.raises(ValueError, match="best"):
        delong_comparison_table(y, {"good": s}, best="missing")


def test_cv_auc_summary():
    s = cv_auc_summary({"a": [0.8, 0.9, np.nan, 1.0], "b": [np.nan]})
    assert s["a"]["mean"] == pytest.approx(0.9) and s["a"]["n_folds"] == 3 and s["a"]["n_undefined"] == 1
    assert s["a"]["sd"] == pytest.approx(0.1)
    assert s["b"]["mean"] is None and s["b"]["n_undefined"] == 1
    json.dumps(s, allow_nan=False)
