"""What each section of the report shows, read from the stages' output files.

Every reader returns plain values (strings already formatted, rows as dicts, figures as data
URIs) for the template; a section whose files are missing says which file it lacks instead of
failing, so the report of a partial run still builds.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from bonemet.modeling import TRAIN_RUNS_FILE
from bonemet.report import figures

log = logging.getLogger(__name__)

#: Metrics of Table 1 in the report, with their headings; the first two carry their CI in the cell.
TABLE1_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"), ("auc", "AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
    ("precision", "precision"), ("f1", "F1"), ("brier", "Brier"),
)
WITH_CI = ("accuracy", "auc")


@dataclass(frozen=True)
class ReportInputs:
    """The files the report reads (the stages' outputs), by role."""

    cohort_dir: Path
    validation_report: Path
    plan: Path
    segmentation_json: Path
    segmentation_cases: Path
    segmentation_plots: Path
    auto_masks: Path
    features_dir: Path
    models_dir: Path
    metrics_dir: Path
    classification_plots: Path
    repeated_json: Path
    registry_json: Path
    #: the evaluate stage's headline numbers (metrics/summary.json)
    summary_json: Path


def sig(value: Any, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits (trailing zeros kept: 0.950, 1.00); 'n/a' when undefined."""
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    text = f"{x:#.{digits}g}"
    return text[:-1] if text.endswith(".") else text


def with_ci(value: Any, lo: Any, hi: Any) -> str:
    """``value (lo-hi)`` at three significant digits (the CI left out when undefined)."""
    text = sig(value)
    if lo is not None and hi is not None and sig(lo) != "n/a" and sig(hi) != "n/a":
        text += f" ({sig(lo)}\u2013{sig(hi)})"
    return text


def read_json(path: Path) -> Any | None:
    """The JSON file's content, or None when it is missing (logged: a section then says so)."""
    if not path.is_file():
        log.info("report: %s not found; its section says so", path)
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def published_study() -> dict[str, Any]:
    """The study's published Table 1, Dice and settings, shipped with the package (``published.json``)."""
    return json.loads(resources.files("bonemet.report").joinpath("published.json").read_text(encoding="utf-8"))


def model_names() -> dict[str, str]:
    from bonemet.modeling.classifiers import DISPLAY_NAMES

    return dict(DISPLAY_NAMES)


# --- 1. cohort ---------------------------------------------------------------------------------


def cohort_section(inputs: ReportInputs, *, dpi: int, pseudonym_key: bytes | None) -> dict[str, Any]:
    """Cases per class and site, spacing and HU distributions, the validation result and its warnings
    (case ids as every stage writes them: pseudonyms with ``pseudonym_key``)."""
    from bonemet.data.manifest import read_manifest_table

    out: dict[str, Any] = {"cohort_dir": str(inputs.cohort_dir), "missing": []}
    manifest = read_manifest_table(inputs.cohort_dir, pseudonym_key=pseudonym_key)
    labels = pd.to_numeric(manifest["label"], errors="coerce")
    sites = manifest["site"].fillna("").replace("", "(none)") if "site" in manifest.columns else None
    counts = pd.crosstab(sites if sites is not None else pd.Series(["all"] * len(manifest), name="site"),
                         labels.rename("label"))
    out["counts_header"] = ["site", *(figures.class_name(int(c)) for c in counts.columns), "cases"]
    out["counts"] = [[str(site), *(int(v) for v in row), int(row.sum())] for site, row in counts.iterrows()]
    if len(counts) > 1:
        out["counts"].append(["all sites", *(int(v) for v in counts.sum()), int(counts.to_numpy().sum())])
    out["n_cases"] = len(manifest)
    out["n_patients"] = int(manifest["patient_id"].nunique()) if "patient_id" in manifest.columns else None

    report = read_json(inputs.validation_report)
    if report is None:
        out["missing"].append(str(inputs.validation_report))
        return out
    out["validation"] = {
        "passed": bool(report.get("passed")), "n_cases": report.get("n_cases"),
        "n_failed": report.get("n_cases_failed", 0), "n_warned": report.get("n_cases_warned", 0),
        "rules": sum(1 for _ in report.get("rules", [])),
        "rules_failed": [r["rule"] for r in report.get("rules", []) if not r.get("success")],
    }
    out["warnings"] = [[case, f["severity"], f["rule"], f["detail"]]
                       for case, fs in sorted(report.get("cases", {}).items()) for f in fs]
    out["warnings"] += [["(manifest)", f["severity"], f["rule"], f["detail"]] for f in report.get("manifest_failures", [])]
    measures = pd.DataFrame(report.get("measurements", []))
    if len(measures) and "spacing_mm" in measures.columns:
        label_of = dict(zip(manifest["case_id"].astype(str), labels, strict=True))
        measures["label"] = [label_of.get(str(c)) for c in measures["case_id"]]
        axes = measures["spacing_mm"].fillna("").str.split("x", expand=True)
        if axes.shape[1] == 3:
            measures["inplane_mm"] = pd.to_numeric(axes[0], errors="coerce")
            measures["slice_mm"] = pd.to_numeric(axes[2], errors="coerce")

            def groups(column: str) -> dict[int, list[float]]:
                return {int(k): g[column].dropna().tolist() for k, g in measures.groupby("label")}

            panels = [("in-plane spacing (mm)", groups("inplane_mm")), ("slice spacing (mm)", groups("slice_mm")),
                      ("lowest HU in the image", groups("hu_min")), ("highest HU in the image", groups("hu_max"))]
            lesion = _lesion_hu(inputs.features_dir, label_of)
            if lesion:
                panels.append(("mean HU in the lesion (manual mask)", lesion))
            out["distributions"] = figures.figure_uri(
                figures.by_class_histograms(panels, "Acquisition and intensity per case, by class"), dpi)
            out["spacing_summary"] = {
                "inplane": f"{sig(measures['inplane_mm'].min())}\u2013{sig(measures['inplane_mm'].max())} mm",
                "slice": f"{sig(measures['slice_mm'].min())}\u2013{sig(measures['slice_mm'].max())} mm",
                "hu": f"{measures['hu_min'].min():.0f} to {measures['hu_max'].max():.0f} HU",
            }
    return out


def _lesion_hu(features_dir: Path, label_of: Mapping[str, Any]) -> dict[int, list[float]] | None:
    path = features_dir / "manual.parquet"
    column = "original_firstorder_Mean"
    if not path.is_file():
        return None
    table = pd.read_parquet(path, columns=["case_id", "label", column])
    return {int(k): g[column].tolist() for k, g in table.groupby("label")}


#: The plan section's table holds at most this many rows (the full plan.json is one link away).
PLAN_MAX_ROWS = 20


def plan_section(inputs: ReportInputs, *, dpi: int, href: str | None = None) -> dict[str, Any] | None:
    """The plan stage's result (``data/plan.json``), when the file exists: a short table (each planned
    setting, its value, whether it came from the plan or from params, and the one-line reason),
    the plan's warnings, one figure of the cohort's fingerprint with the planned grid and window
    marked, and ``href`` (the link to the full file)."""
    plan = read_json(inputs.plan)
    if plan is None:
        return None
    out: dict[str, Any] = {"path": str(inputs.plan), "href": href or str(inputs.plan), "rows": [],
                           "warnings": [str(w) for w in plan.get("warnings", [])]}
    values = plan.get("values")
    if not isinstance(values, Mapping):
        out["note"] = f"{inputs.plan} holds no planned values (not a plan of this bonemet); open the file for its content"
        return out
    reasons = plan_reasons(plan)
    for key, entry in list(values.items())[:PLAN_MAX_ROWS]:
        source = str(entry.get("source", "?"))
        reason = reasons.get(key, "")
        if source == "params":
            planned = entry.get("planned")
            reason = "explicit in params.yaml" + (f" (the plan would choose {_value(planned)})"
                                                  if planned is not None and planned != entry.get("value") else "")
        out["rows"].append([key, _value(entry.get("value")), source, reason])
    fingerprint = plan.get("fingerprint") or {}
    if fingerprint.get("cases"):
        out["figure"] = figures.figure_uri(figures.plan_fingerprint(plan), dpi)
    return out


def plan_reasons(plan: Mapping[str, Any]) -> dict[str, str]:
    """One line per planned setting: how the plan derived it (from ``details`` and ``inputs``)."""
    details, inputs = plan.get("details") or {}, plan.get("inputs") or {}
    spec, budgets = inputs.get("plan") or {}, inputs.get("budgets") or {}
    n = (plan.get("fingerprint") or {}).get("n_cases", "the")
    memory = details.get("memory") or {}
    schedule = details.get("schedule") or {}
    pct = spec.get("intensity_percentiles") or ["?", "?"]
    return {
        "preprocess.target_spacing_mm": (
            f"median spacing of {n} cases{' (coarse axis: its p' + str(spec.get('lowres_axis_percentile')) + ')' if details.get('anisotropic_cohort') else ''}, "
            f"coarsened so a {_value(details.get('field_of_view_mm'))} mm field of view fits "
            f"{_value(budgets.get('max_crop_voxels'))} voxels"),
        "segment.roi_size": (
            f"{_g(spec.get('context_factor'))} x the p{_g(spec.get('lesion_extent_percentile'))} lesion extent "
            f"({_value(details.get('typical_lesion_extent_mm'))} mm), in multiples of {_value(details.get('divisor'))}: "
            f"{_value(details.get('crop_mm'))} mm"),
        "preprocess.crop.min_size_vox": "the training crop (segment.roi_size as x, y, z)",
        "preprocess.hu_window": (f"the lesion voxels' {_g(pct[0])}-{_g(pct[-1])} HU percentiles, bone threshold "
                                 f"{_g(inputs.get('bone_threshold_hu'))} HU inside"),
        "segment.train.max_steps": (
            f"{_g(budgets.get('train_megavoxels'))} million crop voxels per fold over {_value(schedule.get('voxels_per_step'))} "
            f"per step: {_value(schedule.get('epochs'))} epochs of {_value(schedule.get('steps_per_epoch'))} steps"
            if budgets.get("train_megavoxels") is not None else "the epoch schedule (no segment.plan.train_megavoxels)"),
        "segment.train.batch_size": (
            f"{_value(memory.get('step_mb'))} MB per step within {_value(budgets.get('memory_mb'))} MB, "
            f"at most {_value(budgets.get('max_batch_size'))}" if "step_mb" in memory
            else str(memory.get("note", f"at most {_value(budgets.get('max_batch_size'))}"))),
    }


def _g(value: Any) -> str:
    """A number as written in params (0.5, 90, 1.5), anything else as text."""
    return f"{value:g}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _value(value: Any) -> str:
    if isinstance(value, float):
        return sig(value, 4)
    if isinstance(value, list | tuple):
        return ", ".join(_value(v) for v in value) if len(value) <= 12 else f"{len(value)} values"
    return str(value)


# --- 2. example cases ----------------------------------------------------------------------------


def example_cases(cases: pd.DataFrame | None, cohort_ids: Sequence[str], n: int) -> list[tuple[str, str]]:
    """``(case id, why)``: the best and the worst case by Dice, then cases spread between them (median
    first); without per-case Dice the first ``n`` cases of the cohort."""
    if cases is None or "dice" not in cases.columns or cases["dice"].notna().sum() == 0:
        return [(cid, "") for cid in list(cohort_ids)[:n]]
    ranked = cases.dropna(subset=["dice"]).sort_values(["dice", "case_id"], ascending=[False, True])
    ids = ranked["case_id"].astype(str).tolist()
    dice = dict(zip(ids, ranked["dice"], strict=True))
    picks: list[tuple[str, str]] = [(ids[0], "best Dice")]
    if len(ids) > 1:
        picks.append((ids[-1], "worst Dice"))
    for q in (0.5, 0.25, 0.75, 0.1, 0.9):
        if len(picks) >= min(n, len(ids)):
            break
        cid = ids[int(round(q * (len(ids) - 1)))]
        if cid not in {p for p, _ in picks}:
            picks.append((cid, f"{int(q * 100)}th percentile of Dice"))
    return [(cid, f"{why} ({sig(dice[cid])})") for cid, why in picks[:n]]


def examples_section(inputs: ReportInputs, *, n: int, mask_label: int, grid_tolerance_mm: float,
                     roi: str | None, seg_segment: int | str | None, dpi: int,
                     pseudonym_key: bytes | None) -> dict[str, Any]:
    from bonemet.data.manifest import read_manifest_table
    from bonemet.data.synthetic_figure import cases_figure

    cases = read_csv(inputs.segmentation_cases)
    cohort_ids = read_manifest_table(inputs.cohort_dir, pseudonym_key=pseudonym_key)["case_id"].astype(str).tolist()
    picks = example_cases(cases, cohort_ids, n)
    has_auto = inputs.auto_masks.is_dir() and any(inputs.auto_masks.glob("*.nii.gz"))
    fig = cases_figure(inputs.cohort_dir, [cid for cid, _ in picks], mask_label=mask_label,
                       grid_tolerance_mm=grid_tolerance_mm, auto_masks_dir=inputs.auto_masks if has_auto else None,
                       titles={cid: why for cid, why in picks if why}, roi=roi, seg_segment=seg_segment,
                       pseudonym_key=pseudonym_key)
    return {"figure": figures.figure_uri(fig, dpi), "cases": picks, "has_auto": has_auto}


# --- 3. segmentation ------------------------------------------------------------------------------


def _bias_rows(bias: Mapping[str, Any]) -> dict[str, Any]:
    """The segmentation's class-dependent error: Dice per label and per quartile of lesion density
    and size (rows), the gap between the labels and whether it exceeds ``segment.bias.max_dice_gap``."""
    if not bias.get("by_label"):
        return {}
    rows = [[f"label {k}", sig(v.get("n")), sig(v.get("dice_mean"))] for k, v in sorted(bias["by_label"].items())]
    for key, unit, what in (("by_density_quartile", "hu", "lesion median HU"), ("by_size_quartile", "ml", "lesion mL")):
        for g in bias.get(key) or []:
            rows.append([f"{what} quartile {g['quartile']} ({sig(g[f'{unit}_min'])} to {sig(g[f'{unit}_max'])})",
                         sig(g.get("n")), sig(g.get("dice_mean"))])
    gap, limit = bias.get("label_dice_gap"), bias.get("max_dice_gap")
    note = None
    if gap is not None:
        note = (f"Mean Dice of label 1 minus label 0: {gap:+.3f}"
                + (f", more than segment.bias.max_dice_gap {limit:g}: features of the automatic masks may carry "
                   "the segmenter's class-dependent error into the classifiers." if limit is not None and
                   abs(gap) > limit else f", within segment.bias.max_dice_gap {limit:g}." if limit is not None else "."))
    return {"bias": rows, "bias_note": note}



def segmentation_section(inputs: ReportInputs, *, dpi: int) -> dict[str, Any]:
    summary = read_json(inputs.segmentation_json)
    cases = read_csv(inputs.segmentation_cases)
    out: dict[str, Any] = {"missing": [str(p) for p in (inputs.segmentation_json, inputs.segmentation_cases)
                                       if not p.is_file()]}
    if summary is not None:
        out["summary"] = [
            ["model", str(summary.get("model", "n/a"))],
            ["cases", sig(summary.get("n_cases"))],
            ["mean Dice (sd)", f"{sig(summary.get('dice_mean'))} ({sig(summary.get('dice_sd'))})"],
            ["median Dice", sig(summary.get("dice_median"))],
            ["mean HD95 (mm)", sig(summary.get("hd95_mean"))],
            ["mean volume difference, automatic minus manual (mL)", sig(summary.get("volume_diff_ml_mean"))],
            ["mean absolute volume difference (mL)", sig(summary.get("abs_volume_diff_ml_mean"))],
            ["empty automatic masks", sig(summary.get("n_empty_predictions"))],
            ["folds", sig(summary.get("n_folds"))],
            ["epochs per fold (mean)", sig(summary.get("epochs_mean"))],
            ["optimiser steps per fold", sig(summary.get("max_steps")) if summary.get("max_steps") is not None
             else "epoch schedule"],
        ]
        out["dice_mean"] = summary.get("dice_mean")
        out.update(_bias_rows(summary.get("bias") or {}))
    if cases is not None and "dice" in cases.columns and "fold" in cases.columns:
        rows = []
        for fold, group in cases.groupby("fold"):
            rows.append([str(fold), str(len(group)), f"{sig(group['dice'].mean())} ({sig(group['dice'].std())})",
                         sig(group["hd95_mm"].mean()) if "hd95_mm" in group else "n/a",
                         sig(group["volume_diff_ml"].mean()) if "volume_diff_ml" in group else "n/a",
                         str(int(group["empty_prediction"].sum())) if "empty_prediction" in group else "n/a"])
        out["folds"] = rows
        columns = [(c, label) for c, label in (("dice", "Dice"), ("hd95_mm", "HD95 (mm)"),
                                              ("volume_diff_ml", "volume difference (mL)")) if c in cases.columns]
        out["fold_figure"] = figures.figure_uri(figures.fold_boxplots(cases, columns), dpi)
    out["curves"] = figures.file_uri(inputs.segmentation_plots / "curves.png")
    out["histogram"] = figures.file_uri(inputs.segmentation_plots / "dice_histogram.png")
    return out


# --- 4. radiomics ---------------------------------------------------------------------------------


def radiomics_section(inputs: ReportInputs, *, dpi: int) -> dict[str, Any]:
    out: dict[str, Any] = {"missing": []}
    summary = read_json(inputs.features_dir / "summary.json")
    if summary is None:
        out["missing"].append(str(inputs.features_dir / "summary.json"))
    else:
        out["n_features"] = summary.get("n_features")
        out["sources"] = [[name, *(_source_cells(info))] for name, info in summary.get("sources", {}).items()]
    selected = read_json(inputs.models_dir / "selected_features.json")
    if selected is None:
        out["missing"].append(str(inputs.models_dir / "selected_features.json"))
        return out
    out["feature_source"] = selected.get("feature_source")
    steps = []
    if "harmonize" in selected:
        h = selected["harmonize"]
        steps.append(f"ComBat across sites {', '.join(h['sites'])}")
    if "icc" in selected:
        i = selected["icc"]
        steps.append(f"ICC filter ({i['form']} \u2265 {sig(i['threshold'])}): {i['n_kept']} of {i['n_features']} kept"
                     + (" (too few passed: the highest kept)" if i.get("fallback") else ""))
    if "correlation" in selected:
        c = selected["correlation"]
        steps.append(f"correlation filter (|r| > {sig(c['threshold'])} removed): {c['n_kept']} of {c['n_in']} kept")
    if "pca" in selected:
        steps.append(f"PCA: {selected['pca']['n_components']} components")
    lasso = selected.get("lasso", {})
    if lasso:
        steps.append(f"LASSO (lambda {sig(lasso['alpha'])}, {'cross-validated' if lasso['alpha_source'] == 'cv' else 'fixed'}):"
                     f" {lasso['n_selected']} of {lasso['n_in']} kept")
        out["selected"] = [[str(k + 1), f["name"], sig(f["coef"])] for k, f in enumerate(lasso["selected"])]
    out["steps"] = steps
    icc = read_csv(inputs.models_dir / "icc.csv")
    if icc is not None and "icc" in selected:
        out["icc_figure"] = figures.figure_uri(
            figures.icc_histogram(icc["icc"].tolist(), float(selected["icc"]["threshold"]), selected["icc"]["form"]), dpi)
    plots = inputs.classification_plots
    out["lasso_figures"] = [(uri, caption) for name, caption in (
        ("lasso_cv.png", "LASSO: cross-validated error against lambda (Fig. 4a)"),
        ("lasso_path.png", "LASSO coefficient paths (Fig. 4b)"),
        ("lasso_coefficients.png", "coefficients of the selected features"),
    ) if (uri := figures.file_uri(plots / name))]
    return out


def _source_cells(info: Any) -> list[str]:
    if not isinstance(info, Mapping):
        return [str(info), ""]
    if "skipped" in info:
        return ["skipped", str(info["skipped"])]
    return [sig(info.get("n_cases")), sig(info.get("n_dropped", 0))]


# --- 5. classifiers -------------------------------------------------------------------------------


def classifiers_section(inputs: ReportInputs) -> dict[str, Any]:
    names = model_names()
    out: dict[str, Any] = {"missing": []}
    table1 = read_json(inputs.metrics_dir / "table1.json")
    if table1 is None:
        out["missing"].append(str(inputs.metrics_dir / "table1.json"))
    else:
        out.update(_table1_values(table1, names))
    cv = read_json(inputs.metrics_dir / "cv_auc.json")
    if cv is not None:
        out["cv"] = [[names.get(m, m), sig(v["mean"]), sig(v["sd"]), f"{sig(min(v['folds']))}\u2013{sig(max(v['folds']))}",
                      str(len(v["folds"]))] for m, v in _in_model_order(cv)]
    repeated = read_json(inputs.repeated_json)
    if repeated is not None:
        out["repeated"] = _repeated_values(repeated, names)
    delong = read_csv(inputs.metrics_dir / "delong_test.csv")
    if delong is not None:
        out["delong"] = [[names.get(r.best, r.best), names.get(r.other, r.other), sig(r.auc_best), sig(r.auc_other),
                          sig(r.auc_diff), sig(r.z), sig(r.p), sig(r.p_holm)] for r in delong.itertuples()]
    plots = inputs.classification_plots
    out["figures"] = [(uri, caption) for name, caption in (
        ("roc_train.png", "ROC curves, training set (Fig. 5a)"),
        ("roc_test.png", "ROC curves, test set (Fig. 5b)"),
        ("cv_auc.png", "ten-fold CV AUC per model (Fig. 6)"),
        ("calibration_test.png", "calibration on the test set"),
        ("dca_test.png", "decision curves on the test set"),
        ("confusion_train.png", "confusion matrices, training set (each model at its threshold)"),
        ("confusion_test.png", "confusion matrices, test set (each model at its threshold)"),
    ) if (uri := figures.file_uri(plots / name))]
    return out


def _table1_values(table1: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The section's values from ``table1.json``: the registered and best-CV models, Table 1's rows
    (each model's training and test rows, marked), its CI methods and the Bayes-optimal reference."""
    out: dict[str, Any] = {}
    best = table1.get("best_model")
    registered = table1.get("registered_model")
    out["best_model"] = names.get(best, best)
    out["registered_model"] = names.get(registered, registered) if registered else None
    out["registered_by"] = table1.get("registered_by")
    out["train_estimate"] = table1.get("train_estimate")
    rows = []
    for model, sets in _in_model_order(table1["models"]):
        for set_name in ("train", "test"):
            if set_name not in sets:
                continue
            m = sets[set_name]
            cells = [with_ci(m.get(k), m.get(f"{k}_lo"), m.get(f"{k}_hi")) if k in WITH_CI else sig(m.get(k))
                     for k, _ in TABLE1_COLUMNS]
            marks = [mark for mark, on in (("registered", model == registered),
                                           ("best CV", model == best and best != registered)) if on]
            shown_set = "train (resubstitution)" if set_name == "train" and out["train_estimate"] else set_name
            rows.append({"model": names.get(model, model) + (f" ({', '.join(marks)})" if marks else ""),
                         "set": shown_set, "cells": cells,
                         "threshold": sig(m.get("threshold")), "n": sig(m.get("n")),
                         "best": model == (registered or best), "best_cv": model == best and best != registered,
                         "first": set_name == "train"})
    out["table1"] = rows
    out["table1_header"] = [title for _, title in TABLE1_COLUMNS]
    methods: dict[str, list[str]] = {}
    for metric, method in (table1.get("ci_methods") or {}).items():
        methods.setdefault(method, []).append(metric)
    out["ci_methods"] = [f"{', '.join(ms)}: {method}" for method, ms in methods.items()]
    bayes = table1.get("bayes_optimal") or {}
    if bayes.get("auc") is not None:
        out["bayes_auc"] = sig(bayes["auc"])
        ref = bayes.get("test_set_latent_llr") or {}
        if ref:
            out["bayes_reference"] = {
                "n": sig(ref.get("n")), "llr_auc": with_ci(ref.get("llr_auc"), ref.get("llr_auc_lo"),
                                                          ref.get("llr_auc_hi")),
                "diff": f"{sig(ref.get('model_minus_llr'))} ({sig(ref.get('model_minus_llr_lo'))} to "
                        f"{sig(ref.get('model_minus_llr_hi'))})", "p": sig(ref.get("p"))}
    return out


def _repeated_values(repeated: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The section's values from ``repeated.json``: each model's repeated estimate, the registered
    rule's, and its differences to the baseline and to the latent LLR when recorded."""
    values = {
        "n": repeated.get("n_repeats"), "interval": repeated.get("interval"),
        "n_train": repeated.get("n_train"), "n_test": repeated.get("n_test"),
        "registered": names.get(repeated.get("registered_model"), repeated.get("registered_model")),
        "rule": repeated.get("registered_rule"),
        "best_repeated": names.get(repeated.get("best_repeated_model"), repeated.get("best_repeated_model")),
        "rows": [[names.get(m, m), with_ci(v["auc"]["mean"], v["auc"]["lo"], v["auc"]["hi"]),
                  sig(v.get("sensitivity_mean")), sig(v.get("specificity_mean")), sig(v.get("accuracy_mean")),
                  str(v.get("times_chosen", 0))] for m, v in _in_model_order(repeated["models"])],
        "chosen": with_ci(repeated["chosen"]["auc"]["mean"], repeated["chosen"]["auc"]["lo"],
                          repeated["chosen"]["auc"]["hi"]),
    }
    if "baseline" in repeated:
        b, diff = repeated["baseline"]["auc"], repeated["baseline"]["chosen_minus_baseline"]
        values["baseline"] = {
            "auc": with_ci(b["mean"], b["lo"], b["hi"]),
            "diff": f"{_signed(diff['mean'])} ({_signed(diff['lo'])} to {_signed(diff['hi'])})",
            "loses": _number(diff["mean"]) < 0, "clearly": _number(diff["hi"]) < 0}
    if "llr" in repeated:
        gap = repeated["llr"]["chosen_minus_llr"]
        values["llr"] = {"auc": sig(repeated["llr"]["auc"]["mean"]),
                                  "gap": f"{sig(gap['mean'])} ({sig(gap['lo'])} to {sig(gap['hi'])})"}
    return values


def _in_model_order(by_model: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Items in the study's model order (the classifier zoo's), unknown models last."""
    order = list(model_names())
    return sorted(by_model.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


# --- summary ---------------------------------------------------------------------------------------


def summary_section(inputs: ReportInputs) -> dict[str, Any]:
    """The run in a few lines, the registered model and its rule first: from ``summary.json`` (evaluate),
    ``table1.json`` (train) and ``registry.json`` (register), whichever exist."""
    names = model_names()
    headline = read_json(inputs.summary_json) or {}
    table1 = read_json(inputs.metrics_dir / "table1.json") or {}
    decision = read_json(inputs.registry_json) or {}
    out: dict[str, Any] = {"missing": [str(p) for p in (inputs.metrics_dir / "table1.json", inputs.summary_json,
                                                        inputs.registry_json) if not p.is_file()], "rows": []}
    registered = headline.get("registered_model") or table1.get("registered_model") or decision.get("classifier")
    if not registered:
        return out
    out["registered"] = names.get(registered, registered)
    out["rule"] = table1.get("registered_by") or decision.get("registered_by") or headline.get("registered_rule")
    rows = out["rows"]
    if headline:
        rows.append([f"mean test AUC over {headline.get('n_repeats')} repeated splits (the rule, repeat by repeat)",
                     with_ci(headline.get("registered_repeated_auc"), headline.get("registered_repeated_auc_lo"),
                             headline.get("registered_repeated_auc_hi"))])
    test = ((table1.get("models") or {}).get(registered) or {}).get("test") or {}
    if test:
        rows.append(["Table 1 test AUC (the committed split)", with_ci(test.get("auc"), test.get("auc_lo"),
                                                                       test.get("auc_hi"))])
    best = table1.get("best_model") or headline.get("best_cv_model")
    if best:
        rows.append(["best by ten-fold CV AUC on the training set", names.get(best, best)])
    if headline.get("best_repeated_model"):
        top = headline["best_repeated_model"]
        rows.append(["highest mean repeated test AUC", f"{names.get(top, top)} ({sig(headline.get('best_repeated_auc'))}; "
                                                       f"registered minus it {sig(-_number(headline.get('registered_gap_to_best')))})"])
    if headline.get("registered_minus_baseline") is not None:
        rows.append(["registered minus the plain baseline (L1 logistic regression on every feature; paired, same "
                     "splits)", f"{_signed(headline['registered_minus_baseline'])} "
                                f"({_signed(headline.get('registered_minus_baseline_lo'))} to "
                                f"{_signed(headline.get('registered_minus_baseline_hi'))})"])
    if decision:
        rows.append(["registry", f"{decision.get('model_name')} version {decision.get('version')}: "
                                 f"{'promoted: ' if decision.get('promoted') else ''}{decision.get('reason')}"])
    if headline.get("dice_mean") is not None:
        rows.append(["segmentation mean Dice (out of fold)", sig(headline["dice_mean"])])
    return out


def _signed(value: Any) -> str:
    """A difference at three significant digits with its sign (+0.0123, -0.041)."""
    text = sig(value)
    return text if text == "n/a" or text.startswith("-") or text == "0" else f"+{text}"


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --- 6. registry ----------------------------------------------------------------------------------


#: The MLflow UI (3.x) shows training runs, not its GenAI pages, in this mode (it remembers the switch).
UI_MODE = "workflowType=machine_learning"


def run_url(ui_url: str | None, run_id: str | None) -> str | None:
    """The MLflow UI page of a run (``#/runs/<id>`` opens it in its experiment, in the UI's model
    training mode); None without a UI address."""
    if not ui_url or not run_id:
        return None
    return f"{ui_url.rstrip('/')}/#/runs/{run_id}?{UI_MODE}"


def registry_section(inputs: ReportInputs, store: Mapping[str, Any] | None, ui_url: str | None) -> dict[str, Any]:
    """The gate's decision (``registry.json``), the versions and aliases (from the store, when one was
    read) and the MLflow runs behind them."""
    names = model_names()
    out: dict[str, Any] = {"missing": [], "store": None}
    decision = read_json(inputs.registry_json)
    if decision is None:
        out["missing"].append(str(inputs.registry_json))
    else:
        out["decision"] = {
            "model": decision.get("model_name"), "version": decision.get("version"),
            "classifier": names.get(decision.get("classifier"), decision.get("classifier")),
            "promoted": bool(decision.get("promoted")), "reason": decision.get("reason"),
            "repeated_auc": with_ci(decision.get("repeated_auc_mean"), decision.get("repeated_auc_lo"), None),
            "test_auc": sig(decision.get("test_auc")), "cv_auc": sig(decision.get("cv_auc_mean")),
            "threshold": sig(decision.get("threshold")),
            "staging_version": decision.get("staging_version"),
            "compared": bool(decision.get("compared_with_staging")),
            "rule": decision.get("registered_by") or decision.get("registered_rule"),
        }
    runs: list[dict[str, Any]] = []
    provenance = read_json(inputs.metrics_dir / TRAIN_RUNS_FILE) or {}
    if provenance.get("train_run_id"):
        runs.append({"what": "train (parent run)", "run_id": provenance["train_run_id"]})
    for model, info in (provenance.get("models") or {}).items():
        if info.get("run_id"):
            runs.append({"what": f"train: {names.get(model, model)}", "run_id": info["run_id"]})
    if decision is not None and decision.get("source_run_id"):
        runs.append({"what": f"registered {decision.get('model_name')} v{decision.get('version')}",
                     "run_id": decision["source_run_id"]})
    if store is not None:
        out["store"] = {"uri": store.get("uri"), "models": []}
        for model_name, versions in store.get("models", {}).items():
            for v in versions:
                out["store"]["models"].append({
                    "model": model_name, "version": v["version"], "aliases": ", ".join(v["aliases"]) or "\u2014",
                    "run_id": v.get("run_id") or "", "url": run_url(ui_url, v.get("run_id")),
                    "decision": v.get("tags", {}).get("gate_decision", ""),
                })
    for run in runs:
        run["url"] = run_url(ui_url, run["run_id"])
    out["runs"] = runs
    out["ui_url"] = ui_url
    return out


# --- 7. replication -------------------------------------------------------------------------------


def replication_section(inputs: ReportInputs, *, dice_mean: float | None, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The study's published Table 1 and Dice beside ours, model by model, and how the methods differ."""
    paper = published_study()
    names = model_names()
    table1 = read_json(inputs.metrics_dir / "table1.json") or {"models": {}}
    rows = []
    for model, sets in paper["table1"].items():
        ours = table1["models"].get(model, {})
        for set_name in ("train", "test"):
            p, o = sets[set_name], ours.get(set_name, {})
            diff = (o.get("auc") - p["auc"]) if o.get("auc") is not None else None
            rows.append({"model": names.get(model, model), "set": set_name, "first": set_name == "train",
                         "paper_auc": with_ci(p["auc"], p["auc_lo"], p["auc_hi"]),
                         "ours_auc": with_ci(o.get("auc"), o.get("auc_lo"), o.get("auc_hi")),
                         "diff": "n/a" if diff is None else f"{'+' if diff > 0 else ''}{sig(diff)}",
                         "paper": [sig(p[k]) for k in ("accuracy", "sensitivity", "specificity")],
                         "ours": [sig(o.get(k)) for k in ("accuracy", "sensitivity", "specificity")]})
    return {"citation": paper["citation"], "doi": paper["doi"], "rows": rows, "note": paper["table1_note"],
            "paper_dice": sig(paper["segmentation"]["dice_mean"]), "ours_dice": sig(dice_mean),
            "paper": paper, "settings": dict(settings)}


# --- 8. provenance --------------------------------------------------------------------------------


def params_differences(current: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> list[list[str]] | None:
    """``[key, value here, value in the baseline]`` for every leaf that differs (None without a baseline)."""
    if baseline is None:
        return None
    ours, theirs = _flatten(current), _flatten(baseline)

    def raw(value: Any) -> str:  # as written in params.yaml
        if isinstance(value, list | tuple):
            return ", ".join(raw(v) for v in value)
        return "null" if value is None else str(value)

    return [[key, raw(ours.get(key, "(absent)")), raw(theirs.get(key, "(absent)"))]
            for key in sorted(set(ours) | set(theirs)) if ours.get(key, "(absent)") != theirs.get(key, "(absent)")]
