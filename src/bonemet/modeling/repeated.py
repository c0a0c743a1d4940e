"""Repeated evaluation of the whole classification pipeline over random train/test splits.

One 70/30 split gives a test AUC whose split-to-split sd is about 0.04 on a cohort of this size,
so one split is one draw. Radiomics methodologists report the mean over many random splits with
the corrected resampled t interval (Nadeau & Bengio 2003; WORC does so over 100 splits). Here:

* repeat 0 is the committed split of ``splits.json`` (the study's Table 1, read back from the
  train stage's outputs, so it is that table exactly); repeat ``r`` >= 1 is a new stratified
  split (grouped by patient when the manifest has ``patient_id``) with seed ``seed + r``;
* in every repeat everything data-dependent is refitted on that repeat's training cases only:
  ICC, the filters, LASSO, Optuna tuning, the ten-fold CV, calibration, threshold and the final
  fit (:func:`bonemet.modeling.training.fit_model`, the train stage's own function); the model
  of the repeat (``chosen``) is the one the registered rule (``register.model``,
  :func:`choose_registered_model`) picks on its training set, exactly as the train stage picked
  the registered model, so the interval of the chosen model is the interval of what is
  registered; the best by CV is recorded beside it (``best_cv``); the repeat is scored on its
  test cases, at each model's own threshold;
* every repeat also fits the plain baseline (:mod:`bonemet.modeling.baseline`: standardised L1
  logistic regression on every feature, C by inner CV) on the same training cases and scores it on
  the same test cases: the paired difference "chosen model minus baseline" says what the study's
  chain adds over the simplest thing a user would try;
* on a synthetic cohort each repeat also scores the Bayes classifier (the latents'
  log-likelihood ratio, which no image-based model sees) on the same test cases: the paired
  difference "chosen model minus LLR" is the honest distance to the ceiling.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bonemet.modeling import REPEATED_FILE, REPEATED_TABLE, SUMMARY_FILE
from bonemet.modeling.baseline import baseline_scores
from bonemet.modeling.stats import corrected_resampled_t
from bonemet.modeling.training import (
    TrainingInputError,
    choose_best_model,
    choose_registered_model,
    feature_columns,
    fit_model,
    precompute_selection,
    split_data,
)
from bonemet.tracking import NullTracker, Tracker
from bonemet.utils import finite_or

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import EvaluateSpec, SelectSpec, TrainSpec

log = logging.getLogger(__name__)

#: per-model test metrics recorded in every repeat (at the model's own threshold)
REPEAT_METRICS = ("auc", "sensitivity", "specificity", "accuracy", "threshold")


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else math.nan


def run_repeat(
    X: pd.DataFrame,
    y: pd.Series,
    split: Mapping[str, Any],
    *,
    repeat: int,
    primary_cols: Sequence[str],
    select: SelectSpec,
    train: TrainSpec,
    evaluate: EvaluateSpec,
    seed: int,
    case_llr: Mapping[str, float] | None,
    registered_rule: str,
) -> dict[str, Any]:
    """One repeat: the whole pipeline refitted on ``split``'s training cases, scored on its test cases.

    ``chosen`` is the model ``registered_rule`` (``register.model``) picks on the repeat's
    training set; ``best_cv`` the highest CV AUC there.
    Returns ``{repeat, seed, n_train, n_test, chosen, best_cv, baseline_auc, chosen_minus_baseline, models: {model: {auc, sensitivity,
    specificity, accuracy, threshold, cv_auc_mean}}, llr_auc, chosen_minus_llr, seconds}``
    (``llr_*`` NaN without latents). ``seed`` is the repeat's own seed (for its tuning and folds).
    """
    start = time.perf_counter()
    # the repeats already run in parallel processes: each tunes in memory, not in train.tuning.storage
    train = train.updated({"tuning.storage": None, "tuning.workers": 1})
    data = split_data(X, y, split, primary_cols, select.icc.paired_prefix)
    tracker = NullTracker()
    inner, outer = precompute_selection(data, select, train.inner_folds, seed, tracker)
    results = {m: fit_model(m, data, inner, outer, select=select, train=train, evaluate=evaluate, seed=seed,
                            tracker=tracker) for m in train.models}
    cv_aucs = {m: r.cv_aucs for m, r in results.items()}
    chosen = choose_registered_model(registered_rule, cv_aucs, train.models)
    best_cv = choose_best_model(cv_aucs, train.models)
    models = {m: {**{k: float(r.test_metrics[k]) for k in REPEAT_METRICS}, "cv_auc_mean": r.cv_auc_mean}
              for m, r in results.items()}
    baseline = _auc(data.y_test, baseline_scores(data.X_train[data.primary_cols], data.y_train,
                                                  data.X_test[data.primary_cols], spec=evaluate.baseline,
                                                  inner_folds=train.inner_folds, seed=seed, groups=data.train_groups))
    llr_auc = math.nan
    if case_llr is not None and all(i in case_llr for i in data.test_ids):
        llr_auc = _auc(data.y_test, np.asarray([case_llr[i] for i in data.test_ids], dtype=float))
    record = {
        "repeat": int(repeat), "seed": int(seed), "n_train": len(data.train_ids), "n_test": len(data.test_ids),
        "chosen": chosen, "best_cv": best_cv, "models": models, "llr_auc": llr_auc,
        "chosen_minus_llr": models[chosen]["auc"] - llr_auc, "baseline_auc": baseline,
        "chosen_minus_baseline": models[chosen]["auc"] - baseline, "seconds": round(time.perf_counter() - start, 1),
    }
    log.info("repeat %d: chosen %s, test AUC %.3f%s (%.0f s)", repeat, chosen, models[chosen]["auc"],
             "" if math.isnan(llr_auc) else f", LLR {llr_auc:.3f}", record["seconds"])
    return record


def split_baseline_auc(primary: pd.DataFrame, split: Mapping[str, Any], *, evaluate: EvaluateSpec,
                       inner_folds: int, seed: int) -> float:
    """The plain baseline's test AUC on ``split`` (fitted on its training cases), from the primary
    feature table (``case_id``, ``label``, features)."""
    table = primary.set_index(primary["case_id"].astype(str))
    cols = feature_columns(primary)
    train_ids, test_ids = [str(i) for i in split["train"]], [str(i) for i in split["test"]]
    groups = split.get("groups")
    scores = baseline_scores(table.loc[train_ids, cols].astype(np.float64), table.loc[train_ids, "label"].to_numpy(int),
                             table.loc[test_ids, cols].astype(np.float64), spec=evaluate.baseline,
                             inner_folds=inner_folds, seed=seed,
                             groups=[str(groups[i]) for i in train_ids] if groups else None)
    return _auc(table.loc[test_ids, "label"].to_numpy(int), scores)


def committed_repeat(table1: Mapping[str, Any], index: Mapping[str, Any], splits: Mapping[str, Any],
                     seed: int, baseline_auc: float) -> dict[str, Any]:
    """Repeat 0 from the train stage's outputs (``metrics/table1.json``, ``models/index.json``): the
    committed split, exactly as Table 1 reports it; chosen: the registered model of ``index.json``;
    ``baseline_auc``: the plain baseline's on the same split (:func:`split_baseline_auc`)."""
    if "registered_model" not in index:
        raise TrainingInputError("models/index.json names no registered_model (written by an older bonemet): run "
                                 "`bonemet train` again")
    models = {}
    for model, sets in table1["models"].items():
        test = sets["test"]
        models[model] = {**{k: _float(test.get(k)) for k in REPEAT_METRICS},
                         "cv_auc_mean": _float(index["models"][model]["cv_auc_mean"])}
    chosen = str(index["registered_model"])
    reference = (table1.get("bayes_optimal") or {}).get("test_set_latent_llr") or {}
    llr_auc = _float(reference.get("llr_auc"))
    return {"repeat": 0, "seed": int(seed), "n_train": len(splits["train"]), "n_test": len(splits["test"]),
            "chosen": chosen, "best_cv": str(index["best_model"]), "models": models, "llr_auc": llr_auc,
            "chosen_minus_llr": models[chosen]["auc"] - llr_auc, "baseline_auc": float(baseline_auc),
            "chosen_minus_baseline": models[chosen]["auc"] - float(baseline_auc), "seconds": None}


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def run_repeats(
    primary: pd.DataFrame,
    paired: pd.DataFrame,
    splits: Sequence[Mapping[str, Any]],
    *,
    first_repeat: int,
    select: SelectSpec,
    train: TrainSpec,
    evaluate: EvaluateSpec,
    seed: int,
    case_llr: Mapping[str, float] | None,
    n_jobs: int,
    registered_rule: str,
    show_progress: bool = True,
    sites: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_repeat` (the model of each repeat picked by ``registered_rule``) for each of ``splits`` (repeat ``first_repeat + i``, seed ``seed +
    repeat``), in ``n_jobs`` processes (joblib, one thread each); records in repeat order.
    ``sites`` (case id -> site) is what ComBat reads when ``select.harmonize.enabled``."""
    from joblib import Parallel, delayed

    from bonemet.modeling.training import assemble_features
    from bonemet.utils import progress

    if select.harmonize.enabled and not sites:
        raise TrainingInputError("select.harmonize.enabled: ComBat needs each case's site, and the manifest has "
                                 "no site column (add one, or set select.harmonize.enabled false)")
    X, y = assemble_features(primary, paired, select.icc.paired_prefix, sites if select.harmonize.enabled else None)
    X.index = X.index.astype(str)
    y = y.set_axis(X.index)
    cols = feature_columns(primary)
    from bonemet.utils import active_warnings_log

    warnings_log = active_warnings_log()  # the spawned workers write their warnings into the stage's log
    jobs = [delayed(_repeat_job)(X, y, split, first_repeat + i, cols, select, train, evaluate,
                                 seed + first_repeat + i, case_llr, registered_rule, warnings_log)
            for i, split in enumerate(splits)]
    if not jobs:
        return []
    workers = max(1, min(len(jobs), _cores() if n_jobs == -1 else n_jobs))
    log.info("repeated evaluation: %d repeat(s) in %d process(es)", len(jobs), workers)
    parallel = Parallel(n_jobs=workers, backend="loky", return_as="generator")
    return list(progress(parallel(jobs), total=len(jobs), desc="repeats", unit="repeat", disable=not show_progress))


def _cores() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _repeat_job(*args: Any) -> dict[str, Any]:
    """A worker process: one BLAS/OpenMP thread (the processes are the parallelism)."""
    from threadpoolctl import threadpool_limits

    from bonemet.utils import log_context, worker_warnings

    X, y, split, repeat, cols, select, train, evaluate, seed, case_llr, rule, warnings_log = args
    with threadpool_limits(limits=1), worker_warnings(warnings_log), log_context(f"[repeat {repeat}]"):
        return run_repeat(X, y, split, repeat=repeat, primary_cols=cols, select=select, train=train,
                          evaluate=evaluate, seed=seed, case_llr=case_llr, registered_rule=rule)


def summarize_repeats(records: Sequence[Mapping[str, Any]], models: Sequence[str], *, alpha: float) -> dict[str, Any]:
    """Per model and for the per-repeat chosen model: mean over repeats with the corrected resampled
    t interval and the percentile range; how often each model was chosen; on a synthetic cohort the
    LLR's AUC and the paired difference chosen minus LLR.

    The correction uses the repeats' mean training and test sizes.
    """
    n_train = int(round(float(np.mean([r["n_train"] for r in records]))))
    n_test = int(round(float(np.mean([r["n_test"] for r in records]))))

    def interval(values: Sequence[float], bounds: tuple[float, float] = (0.0, 1.0)) -> dict[str, float]:
        return corrected_resampled_t(values, n_train=n_train, n_test=n_test, alpha=alpha, bounds=bounds)

    per_model: dict[str, Any] = {}
    for model in models:
        entry: dict[str, Any] = {"auc": interval([r["models"][model]["auc"] for r in records])}
        for metric in ("sensitivity", "specificity", "accuracy", "threshold"):
            entry[f"{metric}_mean"] = float(np.nanmean([r["models"][model][metric] for r in records]))
        entry["times_chosen"] = int(sum(r["chosen"] == model for r in records))
        entry["times_best_cv"] = int(sum(r.get("best_cv") == model for r in records))
        per_model[model] = entry
    chosen_aucs = [r["models"][r["chosen"]]["auc"] for r in records]
    chosen = {
        "auc": interval(chosen_aucs),
        "sensitivity_mean": float(np.nanmean([r["models"][r["chosen"]]["sensitivity"] for r in records])),
        "specificity_mean": float(np.nanmean([r["models"][r["chosen"]]["specificity"] for r in records])),
    }
    out: dict[str, Any] = {
        "n_repeats": len(records), "alpha": alpha, "n_train": n_train, "n_test": n_test,
        "interval": "corrected resampled t (Nadeau & Bengio 2003): (1/R + n_test/n_train) s^2, t with R-1 df",
        "models": per_model, "chosen": chosen,
    }
    baseline = [r.get("baseline_auc", math.nan) for r in records]
    if all(np.isfinite(baseline)):
        out["baseline"] = {
            "model": "standardised L1 logistic regression on every feature, C by inner CV (evaluate.baseline)",
            "auc": interval(baseline),
            "chosen_minus_baseline": interval([r["chosen_minus_baseline"] for r in records], (-1.0, 1.0)),
        }
    llr = [r["llr_auc"] for r in records]
    if all(np.isfinite(llr)):
        out["llr"] = {"auc": interval(llr), "chosen_minus_llr": interval([r["chosen_minus_llr"] for r in records], (-1.0, 1.0))}
    return out


def best_by_repeats(summary: Mapping[str, Any], order: Sequence[str]) -> str:
    """The model with the highest mean repeated test AUC (ties: the higher corrected lower bound, then
    ``order``). It reads test sets, so it never chooses what is registered: the gate compares the
    registered family with it (``register.max_gap_to_best``)."""
    def key(model: str) -> tuple[float, float, int]:
        auc = summary["models"][model]["auc"]
        return (-finite_or(auc["mean"], -math.inf), -finite_or(auc["lo"], -math.inf), list(order).index(model))

    return min(summary["models"], key=key)


def repeats_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per repeat and model: repeat, seed, model, chosen, best_cv, the test metrics, the LLR's
    and the plain baseline's AUC."""
    rows = [{"repeat": r["repeat"], "seed": r["seed"], "model": m, "chosen": m == r["chosen"],
             "best_cv": m == r.get("best_cv"), **values, "llr_auc": r["llr_auc"],
             "baseline_auc": r.get("baseline_auc", math.nan)}
            for r in records for m, values in r["models"].items()]
    return pd.DataFrame(rows)


def headline(repeated: dict[str, Any], index: dict[str, Any], table1: dict[str, Any],
              segmentation_json: str | Path) -> dict[str, Any]:
    """The numbers worth a column in `dvc exp show`: the registered model, its rule and its
    repeated estimate (the rule's, repeat by repeat), and the family with the highest mean test AUC."""
    registered = repeated["registered_model"]
    chosen = repeated["chosen"]["auc"]
    best = repeated["best_repeated_model"]
    best_auc = repeated["models"][best]["auc"]["mean"]
    out: dict[str, Any] = {
        "n_repeats": repeated["n_repeats"],
        "registered_model": registered,
        "registered_rule": repeated["registered_rule"],
        "registered_table1_test_auc": table1["models"][registered]["test"]["auc"],
        "registered_repeated_auc": chosen["mean"], "registered_repeated_auc_lo": chosen["lo"],
        "registered_repeated_auc_hi": chosen["hi"],
        "best_cv_model": str(index["best_model"]),
        "best_repeated_model": best, "best_repeated_auc": best_auc,
        "registered_gap_to_best": (best_auc - chosen["mean"]) if best_auc is not None and chosen["mean"] is not None
        else None,
    }
    if "baseline" in repeated:
        diff = repeated["baseline"]["chosen_minus_baseline"]
        out.update({"baseline_repeated_auc": repeated["baseline"]["auc"]["mean"],
                    "registered_minus_baseline": diff["mean"], "registered_minus_baseline_lo": diff["lo"],
                    "registered_minus_baseline_hi": diff["hi"]})
    if "llr" in repeated:
        gap = repeated["llr"]["chosen_minus_llr"]
        out.update({"gap_to_llr": gap["mean"], "gap_to_llr_lo": gap["lo"], "gap_to_llr_hi": gap["hi"]})
    if Path(segmentation_json).is_file():
        dice = json.loads(Path(segmentation_json).read_text(encoding="utf-8")).get("dice_mean")
        if dice is not None:
            out["dice_mean"] = dice
    return out


@dataclass(frozen=True)
class RepeatedEvaluation:
    """What the evaluate stage writes: ``repeated`` (repeated.json), ``table`` (repeated.csv, one
    row per repeat and model) and ``headline`` (summary.json)."""

    repeated: dict[str, Any]
    table: pd.DataFrame
    headline: dict[str, Any]


def evaluate_repeated(
    primary: pd.DataFrame,
    paired: pd.DataFrame,
    *,
    committed: Mapping[str, Any],
    table1: dict[str, Any],
    index: dict[str, Any],
    select: SelectSpec,
    train: TrainSpec,
    evaluate: EvaluateSpec,
    test_size: float,
    n_folds: int,
    seed: int,
    feature_source: str,
    segmentation_json: str | Path,
    out_dir: str | Path,
    case_llr: Mapping[str, float] | None = None,
    sites: Mapping[str, str] | None = None,
    tracker: Tracker | None = None,
    show_progress: bool = False,
) -> RepeatedEvaluation:
    """The whole classification pipeline over ``evaluate.repeats`` stratified splits.

    Repeat 0 is the committed split ``committed`` (``data/splits.json``), read back from the train
    stage's ``table1`` and ``index`` (``models/index.json``: the registered model and its rule),
    so it is Table 1 exactly; repeats 1.. are :func:`bonemet.splits.repeated_splits` (grouped by
    the committed split's patients when it has them) run by :func:`run_repeats`. Logs a parent run
    ``evaluate`` with a nested run per repeat to ``tracker`` (the repeats' seconds go there only:
    the outputs hold no timings). Writes ``out_dir``/``repeated.json``, ``repeated.csv`` and
    ``summary.json`` (:class:`RepeatedEvaluation`'s three parts).

    Raises:
        TrainingInputError: ``index`` names no registered model (written by an older bonemet).
    """
    from bonemet.splits import repeated_splits
    from bonemet.tracking import finite_metrics
    from bonemet.utils import atomic_path, json_rounded, write_json

    tracker = tracker or NullTracker()
    rule = index.get("registered_rule")
    if rule is None or "registered_model" not in index:
        raise TrainingInputError(f"{Path(train.out_dir) / 'index.json'} names no registered model (written by an "
                                 "older bonemet): run `bonemet train` again")
    ids, labels = [str(i) for i in primary["case_id"]], [int(v) for v in primary["label"]]
    patients = committed.get("groups")  # the split stage's patients (manifest patient_id), when grouped
    splits = repeated_splits(ids, labels, n_repeats=evaluate.repeats, test_size=test_size, n_folds=n_folds,
                             seed=seed, groups=[str(patients[i]) for i in ids] if patients else None)
    with tracker.run("evaluate", tags={"stage": "evaluate", "feature_source": feature_source}):
        tracker.log_params({"repeats": evaluate.repeats, "seed": seed, "test_size": test_size, "n_folds": n_folds,
                            "n_jobs": evaluate.n_jobs})
        baseline_zero = split_baseline_auc(primary, committed, evaluate=evaluate, inner_folds=train.inner_folds,
                                           seed=seed)
        records = [committed_repeat(table1, index, committed, seed, baseline_zero)]
        records += run_repeats(primary, paired, splits, first_repeat=1, select=select, train=train,
                               evaluate=evaluate, seed=seed, case_llr=case_llr, n_jobs=evaluate.n_jobs,
                               registered_rule=str(rule), show_progress=show_progress, sites=sites)
        # each repeat's seconds go to its MLflow run, not into the outputs (same inputs, same bytes)
        seconds = {record["repeat"]: record.pop("seconds", None) for record in records}
        summary = summarize_repeats(records, train.models, alpha=evaluate.alpha)
        registered = str(index["registered_model"])
        repeated = {**summary, "feature_source": feature_source, "registered_model": registered,
                    "registered_rule": rule, "registered_by": index.get("registered_by", rule),
                    "best_cv_model": index.get("best_model"),
                    "best_repeated_model": best_by_repeats(summary, train.models), "repeats": records}
        result = RepeatedEvaluation(repeated=repeated, table=repeats_table(records),
                                    headline=headline(repeated, index, table1, segmentation_json))
        out = Path(out_dir)
        write_json(out / REPEATED_FILE, json_rounded(repeated))
        with atomic_path(out / REPEATED_TABLE) as tmp:
            result.table.round(6).to_csv(tmp, index=False)
        write_json(out / SUMMARY_FILE, json_rounded(result.headline))
        _log_repeats(tracker, records, seconds)
        tracker.log_metrics(finite_metrics({k: v for k, v in result.headline.items() if isinstance(v, int | float)}))
        tracker.set_tags({"registered_model": registered, "registered_rule": str(rule),
                          "best_repeated_model": repeated["best_repeated_model"]})
        tracker.log_table(pd.DataFrame(result.table), REPEATED_TABLE)
        for name in (REPEATED_FILE, SUMMARY_FILE):
            tracker.log_artifact(out / name)
    _log_summary(repeated)
    return result


def _log_repeats(tracker: Tracker, records: Sequence[Mapping[str, Any]], seconds: Mapping[int, Any]) -> None:
    """A nested run per repeat: its seed and sizes, every model's test metrics, the chosen model's,
    the LLR's and the baseline's, and the seconds it took."""
    from bonemet.tracking import finite_metrics

    for record in records:
        with tracker.run(f"repeat-{record['repeat']}", tags={"repeat": str(record["repeat"]),
                                                              "chosen": record["chosen"]}, nested=True):
            tracker.log_params({"seed": record["seed"], "n_train": record["n_train"], "n_test": record["n_test"]})
            tracker.log_metrics(finite_metrics({f"{m}_{k}": v for m, values in record["models"].items()
                                                for k, v in values.items()}
                                               | {"chosen_auc": record["models"][record["chosen"]]["auc"],
                                                  "llr_auc": record["llr_auc"],
                                                  "chosen_minus_llr": record["chosen_minus_llr"],
                                                  "baseline_auc": record["baseline_auc"],
                                                  "chosen_minus_baseline": record["chosen_minus_baseline"],
                                                  "seconds": seconds[record["repeat"]]}))


def _log_summary(repeated: Mapping[str, Any]) -> None:
    """One log line for the baseline, one for the registered model's repeated estimate."""
    chosen = repeated["chosen"]["auc"]
    if "baseline" in repeated:
        diff = repeated["baseline"]["chosen_minus_baseline"]
        log.info("plain baseline (L1 logistic regression on every feature) over the same splits: test AUC %.3f; "
                 "registered minus it %+.3f (%+.3f to %+.3f)", repeated["baseline"]["auc"]["mean"], diff["mean"],
                 diff["lo"], diff["hi"])
    llr = repeated.get("llr")
    log.info("repeated evaluation over %d splits: registered model %s (register.model %s) test AUC %.3f (%.3f-%.3f)%s; "
             "highest mean test AUC: %s", len(repeated["repeats"]), repeated["registered_model"],
             repeated["registered_rule"], chosen["mean"], chosen["lo"], chosen["hi"],
             "" if llr is None else f", minus the Bayes LLR {llr['chosen_minus_llr']['mean']:+.3f} "
                                    f"({llr['chosen_minus_llr']['lo']:+.3f} to {llr['chosen_minus_llr']['hi']:+.3f})",
             repeated["best_repeated_model"])
