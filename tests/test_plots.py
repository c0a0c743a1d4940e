"""Figures and the data behind them: each plot writes a real PNG; decision-curve arithmetic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bonemet.modeling import plots
from bonemet.modeling.stats import EvaluationInputError


@pytest.fixture(scope="module")
def ev(params):
    """params.yaml's ``evaluate`` section: intervals, calibration bins, figure resolution."""
    return params.evaluate


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.45).astype(int)
    scores = {
        "svm": 1 / (1 + np.exp(-(rng.normal(size=60) + 2 * y - 1))),
        "knn": np.clip(0.3 + 0.4 * y + rng.normal(scale=0.2, size=60), 0, 1),
        "noise": rng.random(60),
    }
    return y, scores


def _png_ok(path):
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roc_plot_and_table(tmp_path, data, ev):
    y, scores = data
    fig = plots.plot_roc(y, scores, title="ROC test", alpha=ev.alpha, auc_ci=ev.auc_ci)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(lab.startswith("svm: AUC ") and "(" in lab for lab in labels)
    _png_ok(plots.save_figure(fig, tmp_path / "roc.png", dpi=ev.figure_dpi))
    table = plots.roc_table(y, scores)
    assert list(table.columns) == ["model", "fpr", "tpr", "threshold"]
    for _, g in table.groupby("model"):
        assert g["fpr"].iloc[0] == 0 and g["fpr"].iloc[-1] == 1 and g["tpr"].is_monotonic_increasing
    csv = plots.write_plot_csv(table, tmp_path / "plots" / "roc_test.csv")
    back = pd.read_csv(csv)
    assert set(back["model"]) == set(scores)


def test_cv_box_plot(tmp_path, data, ev):
    cv = {"svm": [0.9, 0.85, 0.95, 1.0], "knn": [0.7, 0.8, 0.75, np.nan]}
    _png_ok(plots.save_figure(plots.plot_cv_auc_box(cv), tmp_path / "cv.png", dpi=ev.figure_dpi))
    t = plots.cv_auc_table(cv)
    assert t.shape == (8, 3) and list(t.columns) == ["model", "fold", "auc"]


def test_lasso_plots(tmp_path, ev):
    from sklearn.linear_model import LassoCV

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8))
    yv = x[:, 0] - 0.5 * x[:, 3] + rng.normal(scale=0.5, size=50)
    lasso = LassoCV(cv=3, alphas=20, random_state=0).fit(x, yv)
    _png_ok(
        plots.save_figure(
            plots.plot_lasso_cv(lasso.alphas_, lasso.mse_path_, lasso.alpha_), tmp_path / "cv.png",
            dpi=ev.figure_dpi,
        )
    )
    from sklearn.linear_model import lasso_path

    alphas, coefs, _ = lasso_path(x, yv, alphas=lasso.alphas_)
    _png_ok(plots.save_figure(plots.plot_lasso_path(alphas, coefs, lasso.alpha_), tmp_path / "path.png", ev.figure_dpi))
    names = [f"original_firstorder_F{i}" for i in range(8)]
    fig = plots.plot_lasso_coefficients(names, lasso.coef_)
    assert len(fig.axes[0].patches) == int((lasso.coef_ != 0).sum())
    _png_ok(plots.save_figure(fig, tmp_path / "coef.png", dpi=ev.figure_dpi))
    with pytest.raises(EvaluationInputError):
        plots.plot_lasso_cv(lasso.alphas_, lasso.mse_path_[:-1], lasso.alpha_)


def test_confusion_calibration_dca_plots(tmp_path, data, ev):
    y, scores = data
    dpi = ev.figure_dpi
    preds = {m: (s >= 0.5).astype(int) for m, s in scores.items()}
    _png_ok(plots.save_figure(plots.plot_confusion_matrices(y, preds), tmp_path / "cm.png", dpi))
    fig = plots.plot_calibration(y, scores, n_bins=ev.calibration_bins, strategy=ev.calibration_strategy)
    assert any("Brier" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    _png_ok(plots.save_figure(fig, tmp_path / "cal.png", dpi))
    table = plots.calibration_table(y, scores, n_bins=ev.calibration_bins, strategy=ev.calibration_strategy)
    assert set(table["model"]) == set(scores)
    assert table.groupby("model").size().max() <= ev.calibration_bins
    uniform = plots.calibration_table(y, scores, n_bins=3, strategy="uniform")
    assert uniform.groupby("model").size().max() <= 3 and not uniform.equals(table)
    pts = np.linspace(0.05, 0.95, 19)
    _png_ok(plots.save_figure(plots.plot_decision_curve(y, scores, pts), tmp_path / "dca.png", dpi))
    t = plots.decision_curve_table(y, scores, pts)
    assert set(t["model"]) == set(scores) | {"treat all", "treat none"}


def test_net_benefit_hand_example():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])  # prevalence 0.3
    s = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1])
    pt = np.array([0.25, 0.5])
    # pt 0.25: treated 0.9 0.8 0.3 0.7 -> TP 3, FP 1: 0.3 - 0.1 * (1/3)
    # pt 0.5:  treated 0.9 0.8 0.7 -> TP 2, FP 1:      0.2 - 0.1 * 1
    assert plots.net_benefit(y, s, pt) == pytest.approx([0.3 - 0.1 / 3, 0.1])
    assert plots.net_benefit_treat_all(y, pt) == pytest.approx([0.3 - 0.7 / 3, 0.3 - 0.7])
    # a perfect classifier's net benefit is the prevalence at every threshold
    assert plots.net_benefit(y, y.astype(float), pt) == pytest.approx([0.3, 0.3])
    with pytest.raises(EvaluationInputError):
        plots.net_benefit(y, s, [0.0, 0.5])


def test_save_figure_closes_and_is_atomic(tmp_path, data, ev):
    import matplotlib.pyplot as plt

    y, scores = data
    fig = plots.plot_roc(y, scores, alpha=ev.alpha, auc_ci=ev.auc_ci)
    n_before = len(plt.get_fignums())
    plots.save_figure(fig, tmp_path / "sub" / "a.png", dpi=ev.figure_dpi)
    assert len(plt.get_fignums()) == n_before - 1
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]
    # the dpi is the caller's: twice the dpi, about twice the pixels per side (tight bounding box)
    from PIL import Image

    for dpi in (50, 100):
        plots.save_figure(plots.plot_roc(y, scores, alpha=ev.alpha, auc_ci=ev.auc_ci), tmp_path / f"{dpi}.png", dpi)
    small, large = (Image.open(tmp_path / f"{dpi}.png").size for dpi in (50, 100))
    assert large == pytest.approx((2 * small[0], 2 * small[1]), rel=0.03)


def test_threshold_grid():
    g = plots.threshold_grid(0.01, 0.99, 0.01)
    assert len(g) == 99 and g[0] == 0.01 and g[-1] == 0.99
    with pytest.raises(EvaluationInputError):
        plots.threshold_grid(0.0, 0.99, 0.01)


def test_write_classification_and_lasso_plots(tmp_path, data, ev):
    y, scores = data
    paths = plots.write_classification_plots(
        tmp_path / "cls",
        y_train=y,
        y_test=y[:30],
        scores_train=scores,
        scores_test={m: s[:30] for m, s in scores.items()},
        cv_aucs={"svm": [0.8, 0.9], "knn": [0.7, 0.6]},
        dca_thresholds=plots.threshold_grid(0.05, 0.95, 0.05),
        thresholds={"svm": 0.5, "knn": 0.3, "noise": 0.5},
        alpha=ev.alpha,
        auc_ci=ev.auc_ci,
        calibration_bins=ev.calibration_bins,
        calibration_strategy=ev.calibration_strategy,
        dpi=60,
    )
    expected = {"roc_train", "roc_test", "confusion_train", "confusion_test", "cv_auc", "cv_auc_csv",
                "calibration_test", "dca_test"}
    # the curves' data: one CSV per model in a folder (DVC plots draws a folder as one line per file)
    expected |= {f"{curve}/{m}" for curve in ("roc_train", "roc_test", "calibration_test") for m in ("svm", "knn", "noise")}
    expected |= {f"dca_test/{m}" for m in ("svm", "knn", "noise", "treat_all", "treat_none")}
    assert set(paths) == expected
    for name, p in paths.items():
        assert p.exists() and p.stat().st_size > 0, name
    roc = pd.read_csv(paths["roc_test/svm"])
    assert roc.columns.tolist() == ["fpr", "tpr", "threshold"] and roc["tpr"].iloc[-1] == 1.0
    assert pd.read_csv(paths["calibration_test/knn"]).columns.tolist()[:2] == ["mean_predicted", "fraction_positive"]
    assert sorted(p.name for p in (tmp_path / "cls" / "dca_test").iterdir()) == [
        "knn.csv", "noise.csv", "svm.csv", "treat_all.csv", "treat_none.csv"]
    rng = np.random.default_rng(0)
    lp = plots.write_lasso_plots(
        tmp_path / "lasso",
        alphas=np.logspace(-1, -3, 5),
        mse_path=rng.random((5, 3)),
        chosen_alpha=0.01,
        coef_path=rng.normal(size=(4, 5)),
        feature_names=list("abcd"),
        coefs=[0.0, 0.5, -0.2, 0.0],
        dpi=60,
    )
    for p in lp.values():
        assert p.exists() and p.stat().st_size > 0
