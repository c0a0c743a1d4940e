"""Table 1 (one row per model and set) as a DataFrame, DVC metrics JSON and Markdown; DeLong comparisons.

The JSON (``metrics/table1.json``) is DVC metrics: nested dicts of numbers,
``{"models": {model: {set: {metric: v, metric_lo: lo, metric_hi: hi, n: ...}}}, "bayes_optimal": {...}}``,
with every undefined value written as ``null`` (never NaN).

On a synthetic cohort the Bayes-optimal AUC is the cohort's expected ceiling. A 30 % test set is
small (its AUC's CI is about +-0.1), so :func:`bayes_classifier_reference` also scores the Bayes
classifier itself (the latents' log-likelihood ratio, which no image-based model sees) on the
same test cases and compares the best model with it by a paired DeLong test: how far the model is
from the best any classifier could do on *these* cases, and whether that distance is more than
the split's noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonemet.errors import BonemetError
from bonemet.modeling.evaluation import METRICS
from bonemet.modeling.stats import auc_ci_delong, check_binary, delong_difference, delong_test, holm_adjust
from bonemet.utils import atomic_path, write_json

log = logging.getLogger(__name__)

#: Count columns carried into the table and the JSON.
COUNT_COLUMNS: tuple[str, ...] = ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn")
#: Set order in the table.
SET_ORDER: tuple[str, ...] = ("train", "test")

_CI_NAMES = {
    "wilson": "Wilson score interval",
    "bootstrap": "stratified percentile bootstrap",
    "delong-normal": "DeLong (normal approximation, clipped to [0, 1])",
    "delong-logit": "DeLong (on the logit scale)",
}
_MD_COLUMNS = (
    ("accuracy", "accuracy (95% CI)"),
    ("auc", "AUC (95% CI)"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("precision", "precision"),
    ("f1", "F1"),
    ("brier", "Brier"),
)


class Table1Error(BonemetError, ValueError):
    """Table 1 inputs are inconsistent (missing model, missing metric)."""


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def bayes_classifier_reference(
    y_true: Sequence[int] | np.ndarray,
    model_scores: Sequence[float] | np.ndarray,
    latent_llr: Sequence[float] | np.ndarray,
    *,
    alpha: float,
    auc_ci: str,
) -> dict[str, float]:
    """The Bayes classifier on the same test cases as a model, and the model's paired distance to it.

    ``latent_llr``: each test case's posterior log-likelihood ratio from the cohort's latents (the
    synthetic cohort's ``cohort.json``). Returns ``{n, llr_auc, llr_auc_lo, llr_auc_hi,
    model_minus_llr, model_minus_llr_lo, model_minus_llr_hi, p}``: the LLR's AUC with its DeLong
    interval (``auc_ci`` form), and the model's AUC minus it with the paired DeLong interval and
    two-sided p-value.
    """
    y, model, llr = check_binary(y_true, model_scores, latent_llr)
    auc, lo, hi = auc_ci_delong(y, llr, alpha=alpha, method=auc_ci)
    d = delong_difference(y, model, llr, alpha=alpha)
    return {"n": int(y.shape[0]), "llr_auc": auc, "llr_auc_lo": lo, "llr_auc_hi": hi,
            "model_minus_llr": d["diff"], "model_minus_llr_lo": d["diff_lo"],
            "model_minus_llr_hi": d["diff_hi"], "p": d["p"]}


def build_table1(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    bayes_auc: float | None = None,
    best_model: str | None = None,
    bayes_reference: Mapping[str, float] | None = None,
    *,
    registered_model: str | None = None,
    registered_by: str | None = None,
    train_estimate: str | None = None,
) -> pd.DataFrame:
    """One row per model and set from ``{model: {"train": metrics, "test": metrics}}``.

    ``metrics`` are :func:`bonemet.modeling.evaluation.binary_metrics` dicts. Columns: model, set,
    every metric with ``_lo``/``_hi``, the counts, ``is_best``, and ``gap_to_bayes_auc``
    (``bayes_auc - auc``, NaN without ``bayes_auc``). Models keep their input order, sets are
    train then test (others after, in input order). The CI methods are kept in
    ``df.attrs["ci_method"]``, ``bayes_auc``, ``best_model`` and ``bayes_reference`` (the best
    model against the Bayes classifier on the test cases, :func:`bayes_classifier_reference`) in
    ``df.attrs`` too. ``best_model`` is the best by CV on the training set; ``registered_model``
    the family registered (``registered_by``: its rule in words), marked apart from it
    (``is_registered``); ``train_estimate`` says how the training rows were computed (e.g.
    resubstitution), and the tables say it beside those rows.
    """
    for name, value in (("best_model", best_model), ("registered_model", registered_model)):
        if value is not None and value not in results:
            raise Table1Error(f"{name}: expected one of {sorted(results)}, found {value!r}")
    rows: list[dict[str, Any]] = []
    ci_method: dict[str, str] = {}
    for model, per_set in results.items():
        sets = [s for s in SET_ORDER if s in per_set] + [s for s in per_set if s not in SET_ORDER]
        for set_name in sets:
            m = per_set[set_name]
            missing = [k for k in METRICS if k not in m]
            if missing:
                raise Table1Error(f"model {model!r}, set {set_name!r}: metrics {missing} missing")
            row: dict[str, Any] = {"model": model, "set": set_name}
            for k in METRICS:
                row[k] = _f(m[k])
                row[f"{k}_lo"] = _f(m.get(f"{k}_lo"))
                row[f"{k}_hi"] = _f(m.get(f"{k}_hi"))
            for k in COUNT_COLUMNS:
                row[k] = int(m[k]) if k in m else -1
            row["threshold"] = _f(m.get("threshold"))
            row["is_best"] = model == best_model
            row["is_registered"] = model == registered_model
            row["gap_to_bayes_auc"] = (float(bayes_auc) - row["auc"]) if bayes_auc is not None else math.nan
            rows.append(row)
            ci_method.update(m.get("ci_method", {}))
    df = pd.DataFrame(rows)
    df.attrs["ci_method"] = ci_method
    df.attrs["bayes_auc"] = None if bayes_auc is None else float(bayes_auc)
    df.attrs["best_model"] = best_model
    df.attrs["bayes_reference"] = None if bayes_reference is None else dict(bayes_reference)
    df.attrs["registered_model"] = registered_model
    df.attrs["registered_by"] = registered_by
    df.attrs["train_estimate"] = train_estimate
    return df


def _num(v: Any, decimals: int) -> float | int | None:
    if isinstance(v, bool | np.bool_):
        return int(v)
    if isinstance(v, int | np.integer):
        return int(v)
    x = _f(v)
    return None if not math.isfinite(x) else round(x, decimals)


def _shown_model(df: pd.DataFrame, best_model: str | None) -> str | None:
    """The model a single-model statement is about: the registered one when there is one."""
    return df.attrs.get("registered_model") or best_model


def _best_row(df: pd.DataFrame, best_model: str | None) -> pd.Series | None:
    test = df[df["set"] == "test"]
    if test.empty:
        return None
    if best_model is None:
        if test["auc"].notna().sum() == 0:
            return None
        return test.loc[test["auc"].idxmax()]
    hit = test[test["model"] == best_model]
    return None if hit.empty else hit.iloc[0]


def table1_json(
    df: pd.DataFrame, bayes_auc: float | None = None, best_model: str | None = None, decimals: int = 6
) -> dict[str, Any]:
    """The DVC-metrics dict of a :func:`build_table1` frame (numbers or null only)."""
    bayes_auc = df.attrs.get("bayes_auc") if bayes_auc is None else bayes_auc
    best_model = df.attrs.get("best_model") if best_model is None else best_model
    models: dict[str, dict[str, dict[str, Any]]] = {}
    value_cols = [c for c in df.columns if c not in ("model", "set", "is_best", "is_registered", "gap_to_bayes_auc")]
    for row in df.itertuples(index=False):
        r = row._asdict()
        models.setdefault(r["model"], {})[r["set"]] = {c: _num(r[c], decimals) for c in value_cols}
    registered = df.attrs.get("registered_model")
    doc: dict[str, Any] = {"models": models, "best_model": best_model, "best_by": "ten-fold CV AUC on the training set",
                           "registered_model": registered, "registered_by": df.attrs.get("registered_by"),
                           "train_estimate": df.attrs.get("train_estimate"),
                           "ci_methods": {k: _CI_NAMES.get(v, v) for k, v in df.attrs.get("ci_method", {}).items()
                                          if k != "recall"}}
    if bayes_auc is not None:
        best = _best_row(df, _shown_model(df, best_model))
        gap = None if best is None else _num(float(bayes_auc) - best["auc"], decimals)
        doc["bayes_optimal"] = {"auc": _num(bayes_auc, decimals), "registered_test_auc_gap" if registered
                                else "best_test_auc_gap": gap}
    reference = df.attrs.get("bayes_reference")
    if reference:
        doc.setdefault("bayes_optimal", {})["test_set_latent_llr"] = {
            k: _num(v, decimals) for k, v in reference.items()
        }
    return doc


def _cell(row: pd.Series, name: str, decimals: int, with_ci: bool = True) -> str:
    v, lo, hi = row[name], row[f"{name}_lo"], row[f"{name}_hi"]
    if not math.isfinite(v):
        return "n/a"
    text = f"{v:.{decimals}f}"
    if with_ci and math.isfinite(lo) and math.isfinite(hi):
        text += f" ({lo:.{decimals}f}-{hi:.{decimals}f})"
    return text


def table1_markdown(
    df: pd.DataFrame,
    bayes_auc: float | None = None,
    best_model: str | None = None,
    *,
    decimals: int,
    alpha: float,
) -> str:
    """Table 1 as Markdown like the study's: every cell ``value (lo-hi)``, a footnote on CI methods."""
    bayes_auc = df.attrs.get("bayes_auc") if bayes_auc is None else bayes_auc
    best_model = df.attrs.get("best_model") if best_model is None else best_model
    level = f"{100 * (1 - alpha):g}%"
    header = ["model", "set"] + [title.replace("95%", level) for _, title in _MD_COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    registered = df.attrs.get("registered_model")
    resubstitution = bool(df.attrs.get("train_estimate"))
    for _, row in df.iterrows():
        marks = [m for m, on in (("registered", row["model"] == registered),
                                 ("best CV", row["model"] == best_model and best_model != registered)) if on]
        name = f"**{row['model']}**" if row["model"] == (registered or best_model) else row["model"]
        name = f"{name} ({', '.join(marks)})" if marks else name
        set_name = "train (resubstitution)" if resubstitution and row["set"] == "train" else str(row["set"])
        cells = [str(name), set_name] + [_cell(row, k, decimals) for k, _ in _MD_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    methods = df.attrs.get("ci_method", {})
    by_method: dict[str, list[str]] = {}
    for metric, method in methods.items():
        if metric == "recall":
            continue
        by_method.setdefault(_CI_NAMES.get(method, method), []).append(metric)
    foot = "; ".join(f"{', '.join(ms)}: {meth}" for meth, ms in by_method.items())
    lines.append("")
    lines.append(f"{level} confidence intervals in parentheses. CI methods: {foot}.")
    thresholds = df.drop_duplicates("model").set_index("model")["threshold"].dropna()
    if len(thresholds):
        lines.append(
            "Predicted positive (breast origin) when the calibrated probability is at or above the model's "
            "threshold, chosen on the training set's out-of-fold probabilities: "
            + "; ".join(f"{m} {t:.{decimals}f}" for m, t in thresholds.items()) + ".")
    if registered is not None:
        text = f"Registered model (bold): {registered}, by {df.attrs.get('registered_by') or 'register.model'}."
        if best_model is not None and best_model != registered:
            text += f" Best by ten-fold CV AUC on the training set: {best_model} (marked best CV)."
        lines.append(text)
    elif best_model is not None:
        lines.append(f"Best model (bold): {best_model}.")
    if resubstitution:
        lines.append(f"Training rows: {df.attrs['train_estimate']}.")
    if bayes_auc is not None:
        shown = _shown_model(df, best_model)
        best = _best_row(df, shown)
        text = (
            f"Bayes-optimal AUC of this cohort (ceiling for any classifier): {float(bayes_auc):.{decimals}f}."
        )
        if best is not None and math.isfinite(best["auc"]):
            how = "" if shown is not None else " (highest test AUC)"
            which = "Registered model" if registered else "Best model"
            text += (
                f" {which} {best['model']}{how}: test AUC {best['auc']:.{decimals}f}, "
                f"gap {float(bayes_auc) - best['auc']:.{decimals}f}."
            )
        lines.append(text)
    reference = df.attrs.get("bayes_reference")
    if reference:
        r, f = reference, f".{decimals}f"
        lines.append(
            f"On these {r['n']} test cases the Bayes classifier itself (the latents' log-likelihood "
            f"ratio, which no image-based model sees) reaches AUC {r['llr_auc']:{f}} "
            f"({r['llr_auc_lo']:{f}}-{r['llr_auc_hi']:{f}}); {'registered' if registered else 'best'} model minus it: "
            f"{r['model_minus_llr']:+{f}} ({r['model_minus_llr_lo']:+{f}} to {r['model_minus_llr_hi']:+{f}}), "
            f"paired DeLong p = {_p(r['p'])}."
        )
    return "\n".join(lines) + "\n"


def write_table1(
    df: pd.DataFrame,
    json_path: str | Path,
    md_path: str | Path,
    *,
    bayes_auc: float | None = None,
    best_model: str | None = None,
    decimals: int,
    alpha: float,
) -> None:
    """Write Table 1 atomically: DVC metrics JSON (null for undefined) and Markdown.

    ``bayes_auc`` and ``best_model`` default to those given to :func:`build_table1`.
    """
    write_json(json_path, table1_json(df, bayes_auc, best_model))
    text = table1_markdown(df, bayes_auc, best_model, decimals=decimals, alpha=alpha)
    with atomic_path(md_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("Table 1 written: %s, %s (%d rows)", json_path, md_path, len(df))


def delong_comparison_table(
    y_true: Sequence[int] | np.ndarray,
    scores: Mapping[str, Sequence[float] | np.ndarray],
    best: str,
) -> pd.DataFrame:
    """DeLong test of the ``best`` model's ROC curve against each other model's, on the same cases
    (the train stage passes the registered model as ``best``).

    Columns: best, other, auc_best, auc_other, auc_diff (best - other), z, p (two-sided) and
    p_holm (Holm-adjusted over the comparisons in the table). Other models keep input order.
    """
    if best not in scores:
        raise Table1Error(f"best: expected one of {sorted(scores)}, found {best!r}")
    (y,) = check_binary(y_true)
    rows = []
    for other, s in scores.items():
        if other == best:
            continue
        a, b, z, p = delong_test(y, scores[best], s)
        rows.append(
            {"best": best, "other": other, "auc_best": a, "auc_other": b, "auc_diff": a - b, "z": z, "p": p}
        )
    df = pd.DataFrame(rows, columns=["best", "other", "auc_best", "auc_other", "auc_diff", "z", "p"])
    df["p_holm"] = holm_adjust(df["p"].to_numpy()) if len(df) else []
    return df


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def delong_comparison_markdown(df: pd.DataFrame, decimals: int) -> str:
    """The :func:`delong_comparison_table` frame as Markdown."""
    lines = [
        "| registered | other | AUC registered | AUC other | difference | z | p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in df.iterrows():
        lines.append(
            f"| {r['best']} | {r['other']} | {r['auc_best']:.{decimals}f} | {r['auc_other']:.{decimals}f} | "
            f"{r['auc_diff']:+.{decimals}f} | {r['z']:.2f} | {_p(r['p'])} | {_p(r['p_holm'])} |"
        )
    lines.append("")
    lines.append(
        "Two-sided DeLong test for correlated ROC curves (same test cases); Holm-adjusted over the rows."
    )
    return "\n".join(lines) + "\n"
