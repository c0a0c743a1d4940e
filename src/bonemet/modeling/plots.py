"""Figures of the classification stage (matplotlib, Agg backend) and the CSV data behind them.

- ROC curves of several models on one axes, AUC and DeLong CI in the legend (the study's Fig. 5).
- Ten-fold CV AUC box plot per model (Fig. 6).
- LASSO: CV curve (mean MSE +/- sd against log lambda), coefficient path, selected coefficients (Fig. 4).
- Confusion matrices, calibration (reliability) curves with the Brier score, decision curves.

Every plot function returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it
atomically and closes it. ``*_table`` functions return the long-format frames DVC plots read
(:func:`write_plot_csv`). Nothing here reads params: callers pass bins, thresholds, dpi.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bonemet.data.manifest import LABEL_NAMES
from bonemet.modeling.evaluation import brier_score, confusion_counts
from bonemet.modeling.stats import EvaluationInputError, auc_ci_delong, check_binary
from bonemet.utils import atomic_path  # noqa: E402

log = logging.getLogger(__name__)

ArrayLike = Sequence[float] | np.ndarray


# ----------------------------------------------------------------------------------------- output
def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` as an image (format from the suffix, PNG by default) atomically, then close it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt, bbox_inches="tight")
    finally:
        plt.close(fig)
    log.debug("figure written: %s", path)
    return path


def write_plot_csv(df: pd.DataFrame, path: str | Path, decimals: int = 6) -> Path:
    """Write a plot's data as CSV atomically (floats rounded, so reruns give the same bytes)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.round(decimals).to_csv(tmp, index=False)
    return path


def plot_file_name(model: str) -> str:
    """A model's (display) name as a file name: ``Logistic regression`` -> ``logistic_regression``."""
    return "".join(c if c.isalnum() else "_" for c in model.strip().lower()).strip("_") or "model"


def write_plot_dir(df: pd.DataFrame, folder: str | Path, key: str) -> dict[str, Path]:
    """One CSV per model (``df``'s ``model`` column, dropped from the files) in ``folder``,
    replaced atomically; returns ``{"<key>/<file>": path}``."""
    folder = Path(folder)
    paths: dict[str, Path] = {}
    with atomic_path(folder, is_dir=True) as tmp:
        for model, part in df.groupby("model", sort=False):
            name = plot_file_name(str(model))
            part.drop(columns="model").round(6).to_csv(tmp / f"{name}.csv", index=False)
            paths[f"{key}/{name}"] = folder / f"{name}.csv"
    return paths


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


# -------------------------------------------------------------------------------------------- ROC
def roc_table(y_true: ArrayLike, scores: Mapping[str, ArrayLike]) -> pd.DataFrame:
    """ROC points of every model: columns model, fpr, tpr, threshold (sklearn ``roc_curve``)."""
    from sklearn.metrics import roc_curve

    frames = []
    for model, s in scores.items():
        y, s = check_binary(y_true, s)
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
        thr = np.where(np.isfinite(thr), thr, np.nan)  # sklearn puts +inf at the first point
        frames.append(pd.DataFrame({"model": model, "fpr": fpr, "tpr": tpr, "threshold": thr}))
    return pd.concat(frames, ignore_index=True)


def plot_roc(
    y_true: ArrayLike,
    scores: Mapping[str, ArrayLike],
    title: str = "ROC",
    *,
    alpha: float,
    auc_ci: str,
) -> Figure:
    """ROC curves of several models on one axes; legend: model, AUC and its DeLong (1-alpha) CI."""
    table = roc_table(y_true, scores)
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    level = f"{100 * (1 - alpha):g}%"
    for color, model in zip(_colors(len(scores)), scores, strict=True):
        pts = table[table["model"] == model]
        auc, lo, hi = auc_ci_delong(y_true, scores[model], alpha=alpha, method=auc_ci)
        ax.plot(
            pts["fpr"], pts["tpr"], color=color, lw=1.6, label=f"{model}: AUC {auc:.3f} ({lo:.3f}-{hi:.3f})"
        )
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title=title,
        aspect="equal",
    )
    ax.legend(loc="lower right", fontsize=7, title=f"AUC ({level} CI, DeLong)", title_fontsize=7)
    ax.grid(alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------- CV box plot
def cv_auc_table(cv_aucs: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """Fold AUCs in long format: columns model, fold (0-based), auc."""
    rows = [
        {"model": m, "fold": i, "auc": float(a)} for m, aucs in cv_aucs.items() for i, a in enumerate(aucs)
    ]
    return pd.DataFrame(rows, columns=["model", "fold", "auc"])


def plot_cv_auc_box(cv_aucs: Mapping[str, Sequence[float]], title: str = "Cross-validated AUC") -> Figure:
    """Box plot of the per-fold AUC of each model (the study's Fig. 6), fold values overlaid."""
    models = list(cv_aucs)
    data = [np.asarray([a for a in cv_aucs[m] if np.isfinite(a)], dtype=float) for m in models]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(models) + 2), 4.5))
    ax.boxplot(  # fliers off: every fold value is drawn as a point below
        data,
        showmeans=True,
        showfliers=False,
        meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "k"},
    )
    ax.set_xticks(range(1, len(models) + 1), labels=models)
    rng = np.random.default_rng(0)  # jitter only, fixed for identical figures
    for i, (color, d) in enumerate(zip(_colors(len(models)), data, strict=True), start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=12, color=color, alpha=0.8, zorder=3)
    lows = [float(d.min()) for d in data if len(d)]
    ax.set(
        ylabel="AUC per fold (triangle: mean)",
        title=title,
        ylim=(max(0.0, min(lows, default=0.5) - 0.05), 1.02),
    )
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------------ LASSO
def plot_lasso_cv(
    alphas: ArrayLike, mse_path: np.ndarray, chosen_alpha: float, title: str = "LASSO CV"
) -> Figure:
    """Mean CV MSE +/- sd against log(lambda) with a vertical line at the chosen lambda.

    ``alphas`` (n_alphas,) and ``mse_path`` (n_alphas, n_folds) as scikit-learn's ``LassoCV``
    gives them (``alphas_``, ``mse_path_``); lambda is scikit-learn's ``alpha``.
    """
    a = np.asarray(alphas, dtype=float)
    mse = np.asarray(mse_path, dtype=float)
    if mse.ndim != 2 or mse.shape[0] != a.shape[0]:
        raise EvaluationInputError(f"mse_path: expected shape ({a.shape[0]}, n_folds), found {mse.shape}")
    mean, sd = mse.mean(axis=1), mse.std(axis=1)
    x = np.log(a)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.errorbar(x, mean, yerr=sd, fmt="o", ms=3, color="tab:red", ecolor="0.6", elinewidth=0.8, capsize=1.5)
    ax.axvline(math.log(chosen_alpha), ls="--", color="k", lw=1, label=f"lambda = {chosen_alpha:.4g}")
    ax.set(xlabel="log(lambda)", ylabel="mean squared error (CV)", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_lasso_path(
    alphas: ArrayLike,
    coef_path: np.ndarray,
    chosen_alpha: float | None = None,
    title: str = "LASSO coefficient path",
) -> Figure:
    """Coefficient of every feature against log(lambda); ``coef_path`` is (n_features, n_alphas)."""
    a = np.asarray(alphas, dtype=float)
    coefs = np.asarray(coef_path, dtype=float)
    if coefs.ndim != 2 or coefs.shape[1] != a.shape[0]:
        raise EvaluationInputError(
            f"coef_path: expected shape (n_features, {a.shape[0]}), found {coefs.shape}"
        )
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    x = np.log(a)
    for i, row in enumerate(coefs):
        if np.any(row != 0):
            ax.plot(x, row, lw=0.9, color=_colors(10)[i % 10])
    if chosen_alpha is not None:
        ax.axvline(math.log(chosen_alpha), ls="--", color="k", lw=1, label=f"lambda = {chosen_alpha:.4g}")
        ax.legend(fontsize=8)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set(xlabel="log(lambda)", ylabel="coefficient", title=title)
    ax.grid(alpha=0.3)
    return fig


def plot_lasso_coefficients(
    feature_names: Sequence[str], coefs: ArrayLike, title: str = "Selected features (LASSO)"
) -> Figure:
    """Horizontal bars of the nonzero coefficients, sorted by value (the study's Fig. 4c)."""
    c = np.asarray(coefs, dtype=float)
    if len(feature_names) != len(c):
        raise EvaluationInputError(
            f"feature_names: expected {len(c)} names like coefs, found {len(feature_names)}"
        )
    keep = np.flatnonzero(c != 0)
    order = keep[np.argsort(c[keep], kind="mergesort")]
    fig, ax = plt.subplots(figsize=(7.0, max(2.0, 0.28 * len(order) + 1.2)))
    colors = ["tab:blue" if v < 0 else "tab:red" for v in c[order]]
    ax.barh(range(len(order)), c[order], color=colors)
    ax.set_yticks(range(len(order)), labels=[feature_names[i] for i in order], fontsize=7)
    ax.axvline(0, color="0.4", lw=0.6)
    ax.set(xlabel="coefficient (standardised features)", title=f"{title}: {len(order)} features")
    ax.grid(axis="x", alpha=0.3)
    return fig


# ------------------------------------------------------------------------------ confusion matrices
def plot_confusion_matrices(
    y_true: ArrayLike,
    predictions: Mapping[str, ArrayLike],
    title: str = "Confusion matrices",
    ncols: int = 4,
) -> Figure:
    """One 2x2 confusion matrix per model (rows true class, columns predicted; counts and row %)."""
    n = len(predictions)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows + 0.4), squeeze=False)
    for ax, (model, pred) in zip(axes.ravel(), predictions.items(), strict=False):
        y, p = check_binary(y_true, pred)
        c = confusion_counts(y, p.astype(int))
        cm = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, cm.max()))
        for (i, j), v in np.ndenumerate(cm):
            frac = v / max(1, cm[i].sum())
            ax.text(
                j,
                i,
                f"{v}\n{frac:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v > cm.max() / 2 else "black",
            )
        ax.set_xticks([0, 1], labels=[LABEL_NAMES[0], LABEL_NAMES[1]], fontsize=7)
        ax.set_yticks([0, 1], labels=[LABEL_NAMES[0], LABEL_NAMES[1]], fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
        ax.set_title(model, fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ calibration
def calibration_table(
    y_true: ArrayLike, scores: Mapping[str, ArrayLike], n_bins: int, strategy: str
) -> pd.DataFrame:
    """Reliability points per model: columns model, mean_predicted, fraction_positive, brier."""
    from sklearn.calibration import calibration_curve

    frames = []
    for model, s in scores.items():
        y, s = check_binary(y_true, s)
        frac, mean = calibration_curve(y, np.clip(s, 0.0, 1.0), n_bins=n_bins, strategy=strategy)
        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "mean_predicted": mean,
                    "fraction_positive": frac,
                    "brier": brier_score(y, s),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def plot_calibration(
    y_true: ArrayLike,
    scores: Mapping[str, ArrayLike],
    n_bins: int,
    strategy: str,
    title: str = "Calibration",
) -> Figure:
    """Reliability diagram (observed fraction positive against mean predicted probability per bin).

    The legend gives each model's Brier score. ``strategy`` "quantile" (equal-count bins, better
    for small test sets) or "uniform" (equal-width bins), as scikit-learn's ``calibration_curve``.
    """
    table = calibration_table(y_true, scores, n_bins=n_bins, strategy=strategy)
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfectly calibrated")
    for color, model in zip(_colors(len(scores)), scores, strict=True):
        pts = table[table["model"] == model]
        ax.plot(
            pts["mean_predicted"],
            pts["fraction_positive"],
            "o-",
            ms=3,
            lw=1.2,
            color=color,
            label=f"{model}: Brier {pts['brier'].iloc[0]:.3f}",
        )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="mean predicted probability",
        ylabel="observed fraction positive",
        title=f"{title} ({n_bins} {strategy} bins)",
        aspect="equal",
    )
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------------- decision curves
def net_benefit(y_true: ArrayLike, y_score: ArrayLike, thresholds: ArrayLike) -> np.ndarray:
    """Net benefit TP/N - FP/N * pt/(1 - pt) of treating cases with ``y_score >= pt`` (Vickers 2006)."""
    y, s = check_binary(y_true, y_score)
    pt = np.asarray(thresholds, dtype=float)
    if np.any((pt <= 0) | (pt >= 1)):
        raise EvaluationInputError("thresholds: expected threshold probabilities in (0, 1)")
    pred = s[None, :] >= pt[:, None]
    n = len(y)
    tp = (pred & (y[None, :] == 1)).sum(axis=1) / n
    fp = (pred & (y[None, :] == 0)).sum(axis=1) / n
    return tp - fp * pt / (1.0 - pt)


def net_benefit_treat_all(y_true: ArrayLike, thresholds: ArrayLike) -> np.ndarray:
    """Net benefit of treating everyone: prevalence - (1 - prevalence) * pt / (1 - pt)."""
    (y,) = check_binary(y_true)
    pt = np.asarray(thresholds, dtype=float)
    prev = float(y.mean())
    return prev - (1.0 - prev) * pt / (1.0 - pt)


def decision_curve_table(
    y_true: ArrayLike, scores: Mapping[str, ArrayLike], thresholds: ArrayLike
) -> pd.DataFrame:
    """Net benefit per threshold: columns model, threshold, net_benefit; includes treat all / treat none."""
    pt = np.asarray(thresholds, dtype=float)
    frames = [
        pd.DataFrame({"model": m, "threshold": pt, "net_benefit": net_benefit(y_true, s, pt)})
        for m, s in scores.items()
    ]
    frames.append(
        pd.DataFrame(
            {"model": "treat all", "threshold": pt, "net_benefit": net_benefit_treat_all(y_true, pt)}
        )
    )
    frames.append(pd.DataFrame({"model": "treat none", "threshold": pt, "net_benefit": np.zeros_like(pt)}))
    return pd.concat(frames, ignore_index=True)


def plot_decision_curve(
    y_true: ArrayLike, scores: Mapping[str, ArrayLike], thresholds: ArrayLike, title: str = "Decision curve"
) -> Figure:
    """Net benefit against threshold probability for each model, treat all and treat none."""
    table = decision_curve_table(y_true, scores, thresholds)
    (y,) = check_binary(y_true)
    prev = float(y.mean())
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    for color, model in zip(_colors(len(scores)), scores, strict=True):
        pts = table[table["model"] == model]
        ax.plot(pts["threshold"], pts["net_benefit"], lw=1.4, color=color, label=model)
    for model, style in (("treat all", ":"), ("treat none", "-")):
        pts = table[table["model"] == model]
        ax.plot(pts["threshold"], pts["net_benefit"], ls=style, color="k", lw=1.0, label=model)
    ax.set(
        xlim=(float(np.min(thresholds)), float(np.max(thresholds))),
        ylim=(-0.05, max(0.05, prev) + 0.05),
        xlabel="threshold probability",
        ylabel="net benefit",
        title=title,
    )
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------------- stage helpers
def threshold_grid(start: float, stop: float, step: float) -> np.ndarray:
    """Threshold probabilities start, start + step, ..., stop (inclusive, no float drift)."""
    if not 0.0 < start <= stop < 1.0 or step <= 0.0:
        raise EvaluationInputError(
            f"threshold grid: expected 0 < start <= stop < 1 and step > 0, found {start}, {stop}, {step}"
        )
    n = int(round((stop - start) / step)) + 1
    return np.round(start + step * np.arange(n), 10)


def write_classification_plots(
    out_dir: str | Path,
    *,
    y_train: ArrayLike,
    y_test: ArrayLike,
    scores_train: Mapping[str, ArrayLike],
    scores_test: Mapping[str, ArrayLike],
    cv_aucs: Mapping[str, Sequence[float]] | None = None,
    thresholds: Mapping[str, float],
    alpha: float,
    auc_ci: str,
    calibration_bins: int,
    calibration_strategy: str,
    dca_thresholds: ArrayLike | None = None,
    dpi: int,
) -> dict[str, Path]:
    """Write every classification figure and its data into ``out_dir``; return {name: path}.

    Files: ``roc_train.png``, ``roc_test.png`` (Fig. 5), ``cv_auc.png/.csv`` (Fig. 6, when
    ``cv_aucs`` is given), ``confusion_train.png``, ``confusion_test.png`` (each model at its own
    threshold, ``thresholds``), ``calibration_test.png``, ``dca_test.png``. The curves' data go
    to one CSV per model in ``roc_train/``, ``roc_test/``, ``calibration_test/`` and ``dca_test/``
    (``<model>.csv``; DVC plots draw a folder as one line per file, so ``dvc plots diff``
    overlays two experiments' curves). Calibration and decision curves are on the test set only.
    """
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for set_name, y, scores in (("train", y_train, scores_train), ("test", y_test, scores_test)):
        fig = plot_roc(y, scores, title=f"ROC ({set_name})", alpha=alpha, auc_ci=auc_ci)
        paths[f"roc_{set_name}"] = save_figure(fig, out / f"roc_{set_name}.png", dpi=dpi)
        paths.update(write_plot_dir(roc_table(y, scores), out / f"roc_{set_name}", f"roc_{set_name}"))
        preds = {m: (np.asarray(s, dtype=float) >= thresholds[m]).astype(int) for m, s in scores.items()}
        fig = plot_confusion_matrices(y, preds, title=f"Confusion matrices ({set_name}, each model at its threshold)")
        paths[f"confusion_{set_name}"] = save_figure(fig, out / f"confusion_{set_name}.png", dpi=dpi)
    if cv_aucs:
        paths["cv_auc"] = save_figure(plot_cv_auc_box(cv_aucs), out / "cv_auc.png", dpi=dpi)
        paths["cv_auc_csv"] = write_plot_csv(cv_auc_table(cv_aucs), out / "cv_auc.csv")
    fig = plot_calibration(
        y_test,
        scores_test,
        n_bins=calibration_bins,
        strategy=calibration_strategy,
        title="Calibration (test)",
    )
    paths["calibration_test"] = save_figure(fig, out / "calibration_test.png", dpi=dpi)
    paths.update(write_plot_dir(
        calibration_table(y_test, scores_test, n_bins=calibration_bins, strategy=calibration_strategy),
        out / "calibration_test", "calibration_test",
    ))
    pts = (
        threshold_grid(0.01, 0.99, 0.01)
        if dca_thresholds is None
        else np.asarray(dca_thresholds, dtype=float)
    )
    paths["dca_test"] = save_figure(
        plot_decision_curve(y_test, scores_test, pts, title="Decision curve (test)"),
        out / "dca_test.png",
        dpi=dpi,
    )
    paths.update(write_plot_dir(decision_curve_table(y_test, scores_test, pts), out / "dca_test", "dca_test"))
    log.info("classification figures written to %s (%d files)", out, len(paths))
    return paths


def write_lasso_plots(
    out_dir: str | Path,
    *,
    alphas: ArrayLike,
    mse_path: np.ndarray,
    chosen_alpha: float,
    coef_path: np.ndarray,
    feature_names: Sequence[str],
    coefs: ArrayLike,
    path_alphas: ArrayLike | None = None,
    dpi: int,
) -> dict[str, Path]:
    """Write the study's Fig. 4 panels: ``lasso_cv.png/.csv``, ``lasso_path.png``, ``lasso_coefficients.png``.

    ``alphas``/``mse_path`` from ``LassoCV`` (``alphas_``, ``mse_path_``); ``coef_path`` (n_features,
    n_path_alphas) from ``lasso_path`` over ``path_alphas`` (default ``alphas``); ``coefs`` the fitted
    coefficients of ``feature_names``.
    """
    out = Path(out_dir)
    a = np.asarray(alphas, dtype=float)
    mse = np.asarray(mse_path, dtype=float)
    paths = {
        "lasso_cv": save_figure(plot_lasso_cv(a, mse, chosen_alpha), out / "lasso_cv.png", dpi=dpi),
        "lasso_cv_csv": write_plot_csv(
            pd.DataFrame(
                {
                    "lambda": a,
                    "log_lambda": np.log(a),
                    "mse_mean": mse.mean(axis=1),
                    "mse_sd": mse.std(axis=1),
                }
            ),
            out / "lasso_cv.csv",
        ),
        "lasso_path": save_figure(
            plot_lasso_path(a if path_alphas is None else path_alphas, coef_path, chosen_alpha),
            out / "lasso_path.png",
            dpi=dpi,
        ),
        "lasso_coefficients": save_figure(
            plot_lasso_coefficients(feature_names, coefs), out / "lasso_coefficients.png", dpi=dpi
        ),
    }
    return paths
