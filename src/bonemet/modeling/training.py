"""The train stage's library function: selection, tuned classifiers, CV box plot, Table 1.

Protocol (documented choice; the study tuned once and cross-validated once):

1. Features of the training cases only. The ICC filter's paired values come from the other mask
   source (automatic vs manual) as ``paired__`` columns.
2. Tuning: for every model, Optuna (TPE, seeded, median pruner) maximises the mean AUC of an
   inner stratified k-fold CV on the 70 % training set. Selection is refitted inside each inner
   training fold (precomputed once per fold and shared by all trials and models).
3. Ten-fold CV on the training set (the folds of ``splits.json``): the tuned pipeline (selection
   refitted on the nine training folds, classifier with the tuned hyperparameters) is fitted per
   fold and scored on the held-out fold: an AUC per fold per model (the study's Fig. 6). The
   hyperparameters were tuned on the whole training set, so these fold AUCs are mildly optimistic
   for the tuning (not for selection, which is refitted per fold); the untouched test set gives the
   unbiased number.
4. Final fit of each tuned pipeline on the whole training set; predictions on train and test
   (the training rows are resubstitution: the pipeline scores the cases it was fitted on);
   Table 1 with confidence intervals.
5. The registered model (``register.model``, :func:`choose_registered_model`): the family it
   names, or with ``best_cv`` the one with the highest ten-fold CV AUC (ties go to the lower CV
   sd, then to the earlier model in ``train.models``: :func:`choose_best_model`). No choice reads
   a test set. Table 1 marks it, and the best-by-CV model when that is another one;
   ``index.json`` names both, and the evaluate and register stages read them back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bonemet.config import BEST_CV
from bonemet.errors import UserError
from bonemet.modeling import TABLE1_MD, TRAIN_RUNS_FILE
from bonemet.modeling.calibration import CalibratedPipeline, ScoreCalibrator, choose_threshold
from bonemet.modeling.classifiers import DISPLAY_NAMES
from bonemet.modeling.persistence import save_pipeline, trusted_types
from bonemet.modeling.pipeline import build_pipeline
from bonemet.modeling.tuning import FoldData, TuningResult, fold_scores, precompute_folds, tune_model
from bonemet.tracking import NullTracker, Tracker, finite_metrics
from bonemet.utils import atomic_path, finite_or, progress, write_json

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import EvaluateSpec, SelectSpec, TrainSpec

log = logging.getLogger(__name__)

ID_COLUMN = "case_id"
LABEL_COLUMN = "label"
#: Run ids and timings of a train run (they differ between runs of the same data and seed).
#: Metric names logged for every model (the MLflow UI compares runs side by side on these).
SET_METRICS: tuple[str, ...] = ("auc", "auc_lo", "auc_hi", "accuracy", "sensitivity", "specificity",
                                "precision", "npv", "f1", "brier")


class TrainingInputError(UserError, ValueError):
    """Feature tables or splits that do not fit together."""


class MissingFeatureTableError(TrainingInputError, FileNotFoundError):
    """A feature table the train stage needs does not exist (the extract stage has not run)."""


@dataclass
class ModelResult:
    """Everything the stage produced for one classifier."""

    name: str
    tuning: TuningResult
    cv_aucs: list[float]
    pipeline: CalibratedPipeline
    threshold: float
    train_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    scores: dict[str, np.ndarray] = field(repr=False)  # calibrated: "train", "test", "oof" (training cases)
    seconds: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def cv_auc_mean(self) -> float:
        return float(np.mean(self.cv_aucs))

    @property
    def cv_auc_sd(self) -> float:
        return float(np.std(self.cv_aucs, ddof=1)) if len(self.cv_aucs) > 1 else 0.0


@dataclass
class TrainingResults:
    """Output of :func:`run_training`."""

    models: dict[str, ModelResult]
    #: the highest mean ten-fold CV AUC on the training set (:func:`choose_best_model`)
    best_model: str
    #: the family ``register.model`` names (:func:`choose_registered_model`)
    registered_model: str
    selected_features: dict[str, Any]
    table1: pd.DataFrame
    y: dict[str, np.ndarray] = field(repr=False)


#: The other source of each pair; the ICC compares a source with its pair.
PAIRS = {"auto": "manual", "manual": "auto"}


def read_feature_tables(features_dir: str | Path, source: str) -> tuple[pd.DataFrame, pd.DataFrame, str, str]:
    """``(primary, paired, primary name, paired name)``: the feature tables of ``source`` ("auto"
    or "manual") and of its pair for the ICC; "auto" falls back to the annotator masks' features
    when the automatic ones are missing (a cohort without a segmentation run).

    Raises:
        MissingFeatureTableError: a table is missing (the extract stage has not run).
    """
    features_dir = Path(features_dir)

    def path_of(name: str) -> Path:
        return features_dir / f"{name}.parquet"

    primary_name, paired_name = source, PAIRS[source]
    for name in (primary_name, paired_name):
        if name == "auto" and not path_of("auto").is_file() and path_of("annotator").is_file():
            log.warning("%s missing: using annotator-mask features as the automatic-mask stand-in", path_of("auto"))
            if name == primary_name:
                primary_name = "annotator"
            else:
                paired_name = "annotator"
    for name in (primary_name, paired_name):
        if not path_of(name).is_file():
            raise MissingFeatureTableError(f"feature table {path_of(name)} not found (run `bonemet extract` first)")
    return pd.read_parquet(path_of(primary_name)), pd.read_parquet(path_of(paired_name)), primary_name, paired_name


def feature_columns(table: pd.DataFrame) -> list[str]:
    """The feature columns of a feature table (everything but case_id and label)."""
    return [c for c in table.columns if c not in (ID_COLUMN, LABEL_COLUMN)]


def assemble_features(primary: pd.DataFrame, paired: pd.DataFrame, paired_prefix: str,
                      sites: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, pd.Series]:
    """Join two feature tables by case: primary columns, then the paired ones prefixed, then
    (with ``sites``, case id -> site) the ``site`` column that ComBat harmonisation reads.

    Returns ``(X indexed by case_id, y)``. Raises :class:`TrainingInputError` when the case sets,
    feature columns or labels differ, or a case has no site.
    """
    for name, table in (("primary", primary), ("paired", paired)):
        missing = {ID_COLUMN, LABEL_COLUMN} - set(table.columns)
        if missing:
            raise TrainingInputError(f"{name} feature table: expected columns {sorted(missing)}, not found")
    p = primary.set_index(ID_COLUMN)
    q = paired.set_index(ID_COLUMN)
    only_p, only_q = sorted(set(p.index) - set(q.index)), sorted(set(q.index) - set(p.index))
    if only_p or only_q:
        raise TrainingInputError(
            f"primary and paired feature tables hold different cases: only primary {only_p[:5]}, "
            f"only paired {only_q[:5]}"
        )
    q = q.loc[p.index]
    cols = feature_columns(primary)
    missing_cols = [c for c in cols if c not in q.columns]
    if missing_cols:
        raise TrainingInputError(f"paired feature table lacks {len(missing_cols)} feature columns, e.g. {missing_cols[:3]}")
    diff = p.index[(p[LABEL_COLUMN].to_numpy() != q[LABEL_COLUMN].to_numpy())]
    if len(diff):
        raise TrainingInputError(f"labels differ between the feature tables for cases {list(diff[:5])}")
    paired_part = q[cols].add_prefix(paired_prefix)
    X = pd.concat([p[cols], paired_part], axis=1).astype(np.float64)
    if sites is not None:
        from bonemet.data.manifest import SITE_COLUMN

        lacking = [str(c) for c in X.index if not sites.get(str(c))]
        if lacking:
            raise TrainingInputError(
                f"select.harmonize needs every case's site; the manifest gives none for {len(lacking)} case(s), "
                f"e.g. {lacking[:5]}"
            )
        X[SITE_COLUMN] = [str(sites[str(c)]) for c in X.index]
    y = p[LABEL_COLUMN].astype(int)
    return X, y


def _index_splits(ids: Sequence[str], fold_of: Mapping[str, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    folds = np.asarray([int(fold_of[i]) for i in ids])
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in sorted(set(folds))]


def _inner_splits(y: np.ndarray, n_folds: int, seed: int,
                  groups: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The tuning folds in the training set: stratified, and grouped by patient when ``groups``."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None:
        return list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    if len(set(groups)) < n_folds:
        raise TrainingInputError(
            f"train.inner_folds {n_folds}: the training set holds only {len(set(groups))} patients "
            "(folds are grouped by patient); lower train.inner_folds"
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, list(groups)))


def _set_metrics(y: np.ndarray, score: np.ndarray, threshold: float, evaluate: EvaluateSpec,
                 seed: int) -> dict[str, Any]:
    from bonemet.modeling.evaluation import binary_metrics

    return binary_metrics(y, score, threshold=threshold, alpha=evaluate.alpha, n_boot=evaluate.n_bootstrap,
                          seed=seed, auc_ci=evaluate.auc_ci)


def selection_summary(pipeline: Any) -> dict[str, Any]:
    """What the fitted selection steps kept: ICC count, correlation count, LASSO names and coefficients."""
    steps = dict(pipeline.named_steps)
    out: dict[str, Any] = {}
    if "harmonize" in steps:
        harmonize = steps["harmonize"]
        out["harmonize"] = {"method": "ComBat", "sites": [str(s) for s in harmonize.sites_],
                            "parametric": bool(harmonize.parametric), "mean_only": bool(harmonize.mean_only)}
    if "icc" in steps:
        icc = steps["icc"]
        out["icc"] = {
            "form": icc.icc_form,
            "threshold": float(icc.threshold),
            "n_features": int(len(icc.icc_)),
            "n_kept": int(icc.get_support().sum()),
            "fallback": bool(icc.fallback_),
            "icc_median": float(np.nanmedian(icc.icc_.to_numpy())) if len(icc.icc_) else None,
        }
    if "correlation" in steps:
        corr = steps["correlation"]
        out["correlation"] = {"threshold": float(corr.threshold), "n_in": int(corr.n_features_in_),
                              "n_kept": int(corr.get_support().sum())}
    if "pca" in steps:
        out["pca"] = {"n_components": int(steps["pca"].n_components_)}
    lasso = steps["lasso"]
    names = lasso.get_feature_names_out()
    coef = lasso.coef_[lasso.get_support()]
    order = np.argsort(-np.abs(coef), kind="stable")
    out["lasso"] = {
        "alpha": float(lasso.alpha_),
        "alpha_source": "cv" if lasso.alpha is None else "fixed",
        "n_in": int(lasso.n_features_in_),
        "n_selected": int(len(names)),
        "fallback": bool(lasso.fallback_),
        "selected": [{"name": str(names[i]), "coef": float(coef[i])} for i in order],
    }
    return out


def icc_table(pipeline: Any) -> pd.DataFrame | None:
    """``feature, icc, kept``: the fitted ICC filter's value for every feature (None without one)."""
    steps = dict(pipeline.named_steps)
    if "icc" not in steps:
        return None
    icc = steps["icc"]
    values = icc.icc_
    return pd.DataFrame({"feature": [str(c) for c in values.index], "icc": values.to_numpy(dtype=float),
                         "kept": icc.get_support()[icc.primary_idx_].astype(bool)})


def choose_best_model(cv_aucs: Mapping[str, Sequence[float]], order: Sequence[str]) -> str:
    """The model with the highest mean CV AUC; ties go to the lower CV sd, then to the model
    earlier in ``order`` (``train.models``). Never looks at a test set."""
    def key(model: str) -> tuple[float, float, int]:
        values = np.asarray(cv_aucs[model], dtype=float)
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return (-float(np.mean(values)), sd, list(order).index(model))

    return min(cv_aucs, key=key)


#: how Table 1's training rows were computed (the pipeline scores the cases it was fitted on)
RESUBSTITUTION = ("resubstitution: each pipeline scores the training cases it was fitted on (optimistic; a "
                  "memorising model such as KNN reaches 1.000 there); the ten-fold CV AUC is the training set's "
                  "honest estimate")


def choose_registered_model(rule: str, cv_aucs: Mapping[str, Sequence[float]], order: Sequence[str]) -> str:
    """The family ``register.model`` (``rule``) registers: the family it names, or with ``best_cv``
    :func:`choose_best_model`'s. Reads CV AUCs of the training set only, never a test set.

    Raises:
        TrainingInputError: ``rule`` names a model that was not trained.
    """
    if rule == BEST_CV:
        return choose_best_model(cv_aucs, order)
    if rule not in cv_aucs:
        raise TrainingInputError(f"register.model '{rule}' was not trained (trained: {', '.join(cv_aucs)}); name one "
                                 f"of them or {BEST_CV}")
    return rule


def registered_rule_text(rule: str) -> str:
    """``register.model`` in words, for Table 1, the report, MLflow and the registry."""
    if rule == BEST_CV:
        return ("register.model best_cv: the highest mean ten-fold CV AUC on the training set (ties: the lower sd, "
                "then train.models' order); no test set read")
    return f"register.model {rule}: the family named in params (no test set read)"


def _figures(
    results: Mapping[str, ModelResult],
    y: Mapping[str, np.ndarray],
    plots_dir: Path,
    lasso: Any,
    evaluate: EvaluateSpec,
) -> list[Path]:
    """Every classification figure (+ CSVs) and the LASSO panels (study's Figs. 4-6) into ``plots_dir``."""
    from bonemet.modeling import plots

    paths = plots.write_classification_plots(
        plots_dir,
        y_train=y["train"],
        y_test=y["test"],
        scores_train={display_name(m): r.scores["train"] for m, r in results.items()},
        scores_test={display_name(m): r.scores["test"] for m, r in results.items()},
        cv_aucs={display_name(m): r.cv_aucs for m, r in results.items()},
        thresholds={display_name(m): r.threshold for m, r in results.items()},
        alpha=evaluate.alpha,
        auc_ci=evaluate.auc_ci,
        calibration_bins=evaluate.calibration_bins,
        calibration_strategy=evaluate.calibration_strategy,
        dca_thresholds=plots.threshold_grid(*evaluate.dca_thresholds),
        dpi=evaluate.figure_dpi,
    )
    if lasso.mse_path_ is not None:
        support = lasso.get_support()
        paths.update(
            plots.write_lasso_plots(
                plots_dir,
                alphas=lasso.alphas_,
                mse_path=lasso.mse_path_,
                chosen_alpha=lasso.alpha_,
                coef_path=lasso.coef_path_,
                feature_names=list(lasso.get_feature_names_out()),
                coefs=lasso.coef_[support],
                path_alphas=lasso.path_alphas_,
                dpi=evaluate.figure_dpi,
            )
        )
    return list(paths.values())


def _model_figures(tracker: Tracker, model: str, y_test: np.ndarray, score: np.ndarray, threshold: float,
                   evaluate: EvaluateSpec) -> None:
    """This model's test ROC and confusion matrix (at its threshold), logged to its own (nested) run."""
    import matplotlib.pyplot as plt

    from bonemet.modeling import plots

    name = display_name(model)
    for fig_name, fig in (
        ("roc_test.png", plots.plot_roc(y_test, {name: score}, title=f"ROC (test): {name}",
                                        alpha=evaluate.alpha, auc_ci=evaluate.auc_ci)),
        ("confusion_test.png", plots.plot_confusion_matrices(
            y_test, {name: (score >= threshold).astype(int)}, title=f"Confusion (test): {name}", ncols=1)),
    ):
        tracker.log_figure(fig, fig_name)
        plt.close(fig)


@dataclass
class _Data:
    """The feature matrix split into the training and test cases, with the training folds."""

    X_train: pd.DataFrame
    y_train: np.ndarray
    X_test: pd.DataFrame
    y_test: np.ndarray
    train_ids: list[str]
    test_ids: list[str]
    primary_cols: list[str]
    outer: list[tuple[np.ndarray, np.ndarray]]
    #: the columns a served row holds: the primary features (and ``site`` when harmonised)
    input_cols: list[str]
    #: patient of each training case (splits' ``groups``), or None when the splits are not grouped
    train_groups: list[str] | None = None


def _training_data(primary: pd.DataFrame, paired: pd.DataFrame, splits: Mapping[str, Any], prefix: str,
                   sites: Mapping[str, str] | None = None) -> _Data:
    """Join the two sources (and the sites) and cut them by ``splits`` (train, test, train_folds)."""
    X, y = assemble_features(primary, paired, prefix, sites)
    X.index = X.index.astype(str)
    return split_data(X, y.set_axis(X.index), splits, feature_columns(primary), prefix)


def split_data(X: pd.DataFrame, y: pd.Series, splits: Mapping[str, Any], primary_cols: Sequence[str],
               paired_prefix: str) -> _Data:
    """The feature matrix (rows indexed by case_id) cut into ``splits``' training and test cases,
    with the training set's folds (``train_folds``) and, when the splits are grouped, the
    training cases' patients (``groups``)."""
    train_ids = [str(i) for i in splits["train"]]
    test_ids = [str(i) for i in splits["test"]]
    unknown = sorted(set(train_ids + test_ids) - set(X.index))
    if unknown:
        raise TrainingInputError(f"splits name cases missing from the feature tables: {unknown[:5]}")
    if "train_folds" not in splits:
        raise TrainingInputError("splits lack 'train_folds' (the ten folds in the training set): run `bonemet split`")
    outer = _index_splits(train_ids, {str(k): v for k, v in splits["train_folds"].items()})
    groups = splits.get("groups")
    train_groups = [str(groups[i]) for i in train_ids] if groups else None
    primary_cols = list(primary_cols)
    input_cols = primary_cols + [c for c in X.columns if c not in primary_cols and not c.startswith(paired_prefix)]
    return _Data(X.loc[train_ids], y.loc[train_ids].to_numpy(), X.loc[test_ids], y.loc[test_ids].to_numpy(),
                 train_ids, test_ids, primary_cols, outer, input_cols, train_groups)


def precompute_selection(data: _Data, select: SelectSpec, inner_folds: int, seed: int,
                          tracker: Tracker) -> tuple[list[FoldData], list[FoldData]]:
    """Selection fitted once per inner fold (tuning) and per outer fold (CV), shared by every model."""
    log.info("selection inside %d inner folds (tuning) and %d outer folds (CV)", inner_folds, len(data.outer))
    t_sel, c_sel = time.perf_counter(), time.process_time()
    inner_splits = _inner_splits(data.y_train, inner_folds, seed, data.train_groups)
    inner = precompute_folds(data.X_train, data.y_train, inner_splits, select, seed)
    outer = precompute_folds(data.X_train, data.y_train, data.outer, select, seed)
    selection_s, selection_cpu_s = time.perf_counter() - t_sel, time.process_time() - c_sel
    log.info("selection precomputed for %d folds in %.1f s (CPU %.1f s)", len(inner) + len(outer),
             selection_s, selection_cpu_s)
    tracker.log_metrics({"time_selection_s": selection_s, "time_selection_cpu_s": selection_cpu_s})
    return inner, outer


def fit_model(model: str, data: _Data, inner: Sequence[FoldData], outer: Sequence[FoldData], *,
              select: SelectSpec, train: TrainSpec, evaluate: EvaluateSpec, seed: int,
              tracker: Tracker | None = None) -> ModelResult:
    """Tune one model, cross-validate it, calibrate it and choose its threshold on the training set,
    fit it on the whole training set and score both sets. Writes nothing.

    1. Optuna on the inner folds (``inner``: selection precomputed per fold).
    2. Ten-fold CV (``outer``): each fold's classifier, with the tuned hyperparameters, scores its
       held-out cases: the fold AUCs (the study's Fig. 6) and an out-of-fold score per training case.
    3. The calibrator (``train.calibration``) is fitted on those out-of-fold scores, and the
       threshold (``train.operating_point``) chosen on their calibrated values.
    4. The pipeline (selection + classifier) is fitted on the whole training set and wrapped with
       the calibrator and threshold (:class:`~bonemet.modeling.calibration.CalibratedPipeline`).
    """
    from sklearn.metrics import roc_auc_score

    tracker = tracker or NullTracker()
    t0, c0 = time.perf_counter(), time.process_time()
    tuned = tune_model(model, inner, train.search_space.get(model, {}), train.n_trials[model], seed,
                       fixed_params=train.fixed_params.get(model, {}),
                       pruner_startup_trials=train.pruner_startup_trials, storage=train.tuning.storage,
                       workers=train.tuning.workers, tracker=tracker)
    t1 = time.perf_counter()
    oof = np.full(len(data.y_train), np.nan)
    cv_aucs = []
    for (_, val_idx), fold in zip(data.outer, outer, strict=True):
        scores = fold_scores(model, tuned.best_params, fold, seed)
        oof[val_idx] = scores
        if len(np.unique(fold.y_val)) < 2:
            raise TrainingInputError(f"a ten-fold CV fold of the training set holds one class only ({model})")
        cv_aucs.append(float(roc_auc_score(fold.y_val, scores)))
    t2 = time.perf_counter()
    calibrator = ScoreCalibrator(method=train.calibration).fit(oof, data.y_train)
    oof_calibrated = calibrator.transform(oof)
    threshold = choose_threshold(oof_calibrated, data.y_train, train.operating_point)
    pipeline = build_pipeline(model, tuned.best_params, select, seed).fit(data.X_train, data.y_train)
    fitted = CalibratedPipeline(pipeline=pipeline, calibrator=calibrator, threshold=threshold)
    s_train = fitted.predict_proba(data.X_train)[:, 1]
    s_test = fitted.predict_proba(data.X_test)[:, 1]
    m_train = _set_metrics(data.y_train, s_train, threshold, evaluate, seed)
    m_test = _set_metrics(data.y_test, s_test, threshold, evaluate, seed)
    t3 = time.perf_counter()
    return ModelResult(model, tuned, cv_aucs, fitted, threshold, m_train, m_test,
                       {"train": s_train, "test": s_test, "oof": oof_calibrated},
                       {"tune_s": t1 - t0, "cv_s": t2 - t1, "final_fit_eval_s": t3 - t2,
                        "total_s": time.perf_counter() - t0, "total_cpu_s": time.process_time() - c0})


def _without_password(url: str | None) -> str:
    """A database URL as it may be logged: any password masked (``memory`` for none)."""
    from bonemet.search import storage_for_log

    return storage_for_log(url)


def _record_model(res: ModelResult, data: _Data, *, train: TrainSpec, evaluate: EvaluateSpec,
                  tracker: Tracker) -> None:
    """The train stage's record of one model: its nested run's params, metrics, figures, trials
    and model, and ``<train.out_dir>/<model>.skops``."""
    model, tuned = res.name, res.tuning
    tracker.log_params({"model": model, **{f"hp.{k}": v for k, v in tuned.best_params.items()},
                        "n_trials": tuned.n_trials, "n_pruned": tuned.n_pruned, "calibration": train.calibration,
                        "threshold_rule": train.operating_point.rule,
                        **({"optuna_study": tuned.study} if tuned.study else {})})
    for k, auc in enumerate(res.cv_aucs):
        tracker.log_metrics({"cv_auc": auc}, step=k)
    metrics = {"cv_auc_mean": res.cv_auc_mean, "cv_auc_sd": res.cv_auc_sd, "inner_cv_auc": tuned.best_value,
               "threshold": res.threshold}
    for set_name, m in (("train", res.train_metrics), ("test", res.test_metrics)):
        metrics.update({f"{set_name}_{k}": m[k] for k in SET_METRICS})
    tracker.log_metrics(finite_metrics(metrics))
    if train.log_figures:
        _model_figures(tracker, model, data.y_test, res.scores["test"], res.threshold, evaluate)
    if len(tuned.trials):
        tracker.log_table(tuned.trials, "optuna_trials.csv")
    save_pipeline(res.pipeline, Path(train.out_dir) / f"{model}.skops")
    if train.log_models:
        example = data.X_test[data.input_cols].head(5)
        _log_model(tracker, res.pipeline, example.astype({c: np.float64 for c in data.primary_cols}))
    tracker.log_metrics({f"time_{k}": v for k, v in res.seconds.items()})
    log.info("%s: CV AUC %.3f +- %.3f, threshold %.3f, test AUC %.3f (%s)", model, res.cv_auc_mean,
             res.cv_auc_sd, res.threshold, res.test_metrics["auc"],
             ", ".join(f"{k} {v:.1f}" for k, v in res.seconds.items()))


def _bayes_reference(data: _Data, best: ModelResult, case_llr: Mapping[str, float] | None,
                     evaluate: EvaluateSpec) -> dict[str, float] | None:
    """The latents' LLR scored on the test cases and the registered model's paired distance to it."""
    from bonemet.modeling.table1 import bayes_classifier_reference

    if case_llr is None:
        return None
    if not all(i in case_llr for i in data.test_ids):
        log.warning("cohort LLRs miss some test cases: no Bayes-classifier reference in Table 1")
        return None
    reference = bayes_classifier_reference(data.y_test, best.scores["test"], [float(case_llr[i]) for i in data.test_ids],
                                           alpha=evaluate.alpha, auc_ci=evaluate.auc_ci)
    log.info("Bayes classifier (latents' LLR) on the %d test cases: AUC %.3f; %s minus it %+.3f (%+.3f to %+.3f), "
             "p %.3g", reference["n"], reference["llr_auc"], best.name, reference["model_minus_llr"],
             reference["model_minus_llr_lo"], reference["model_minus_llr_hi"], reference["p"])
    return reference


def _write_outputs(results: Mapping[str, ModelResult], best: str, data: _Data, *, registered: str, rule: str,
                   feature_source: str, train: TrainSpec, evaluate: EvaluateSpec, bayes_auc: float | None,
                   reference: Mapping[str, float] | None, tracker: Tracker,
                   train_run_id: str | None) -> tuple[dict[str, Any], pd.DataFrame]:
    """models/ (index, selected features), metrics/ (CV AUCs, Table 1, DeLong), plots/; logged to the parent run.

    ``best``: the best model by CV; ``registered``: the family ``rule`` (``register.model``) names. What
    is shown for one model (selected features, ICC, LASSO figures, DeLong, the Bayes reference) is
    the registered model's."""
    from bonemet.modeling.table1 import (
        build_table1,
        delong_comparison_markdown,
        delong_comparison_table,
        write_table1,
    )

    out_dir, plots_dir, metrics_dir = Path(train.out_dir), Path(train.plots_dir), Path(train.metrics_dir)
    selected = {"feature_source": feature_source, "model": registered,
                **selection_summary(results[registered].pipeline)}
    write_json(out_dir / "selected_features.json", selected)
    write_json(out_dir / "index.json", {
        "registered_model": registered,
        "registered_rule": rule,
        "registered_by": registered_rule_text(rule),
        "best_model": best,
        "best_by": "cv_auc_mean (ties: lower cv_auc_sd, then the order of train.models)",
        "feature_source": feature_source,
        "feature_names": data.primary_cols,
        # besides the features, a served row must hold these (site: ComBat harmonisation is on)
        "extra_input_columns": [c for c in data.input_cols if c not in data.primary_cols],
        "models": {m: {"path": f"{m}.skops", "cv_auc_mean": r.cv_auc_mean, "cv_auc_sd": r.cv_auc_sd,
                       "threshold": r.threshold, "test_auc": finite_or(r.test_metrics["auc"], None),
                       "params": r.tuning.best_params}
                   for m, r in results.items()},
    })
    # what differs between two runs of the same data and seed (run ids; the times are on the runs)
    write_json(metrics_dir / TRAIN_RUNS_FILE, {
        "train_run_id": train_run_id, "models": {m: {"run_id": r.run_id} for m, r in results.items()},
    })
    write_json(metrics_dir / "cv_auc.json", {m: {"mean": r.cv_auc_mean, "sd": r.cv_auc_sd, "folds": r.cv_aucs}
                                            for m, r in results.items()})
    table = build_table1({m: {"train": r.train_metrics, "test": r.test_metrics} for m, r in results.items()},
                         bayes_auc=bayes_auc, best_model=best, bayes_reference=reference,
                         registered_model=registered, registered_by=registered_rule_text(rule),
                         train_estimate=RESUBSTITUTION)
    write_table1(table, metrics_dir / "table1.json", metrics_dir / TABLE1_MD, bayes_auc=bayes_auc,
                 best_model=best, alpha=evaluate.alpha, decimals=evaluate.decimals)
    delong = delong_comparison_table(data.y_test, {m: r.scores["test"] for m, r in results.items()}, registered)
    with atomic_path(metrics_dir / "delong_test.md") as tmp:
        tmp.write_text(delong_comparison_markdown(delong, decimals=evaluate.decimals), encoding="utf-8")
    with atomic_path(metrics_dir / "delong_test.csv") as tmp:
        delong.round(6).to_csv(tmp, index=False)
    icc = icc_table(results[registered].pipeline)
    if icc is not None:  # every feature's ICC (the distribution the report draws), as fitted on the training set
        with atomic_path(out_dir / "icc.csv") as tmp:
            icc.round(6).to_csv(tmp, index=False)
    figures: list[Path] = []
    if train.write_figures:
        figures = _figures(results, {"train": data.y_train, "test": data.y_test}, plots_dir,
                           results[registered].pipeline.named_steps["lasso"], evaluate)
    tracker.set_tags({"registered_model": registered, "registered_rule": rule,
                      "registered_by": registered_rule_text(rule), "best_cv_model": best})
    tracker.log_metrics(finite_metrics({"best_cv_auc_mean": results[best].cv_auc_mean,
                                 "registered_cv_auc_mean": results[registered].cv_auc_mean,
                                 "registered_test_auc": results[registered].test_metrics["auc"],
                                 **({"bayes_auc": bayes_auc} if bayes_auc is not None else {}),
                                 **({"bayes_llr_test_auc": reference["llr_auc"],
                                     "registered_minus_bayes_llr_test_auc": reference["model_minus_llr"]}
                                    if reference is not None else {})}))
    tracker.log_dict(selected, "selected_features.json")
    tracker.log_table(delong, "delong_test.csv")
    for path in (metrics_dir / "table1.json", metrics_dir / TABLE1_MD, metrics_dir / "cv_auc.json",
                 metrics_dir / "delong_test.md"):
        tracker.log_artifact(path)
    for path in figures:
        tracker.log_artifact(path, artifact_path="plots")
    return selected, table


def run_training(
    primary: pd.DataFrame,
    paired: pd.DataFrame,
    splits: Mapping[str, Any],
    *,
    select: SelectSpec,
    train: TrainSpec,
    evaluate: EvaluateSpec,
    seed: int,
    feature_source: str,
    registered_rule: str,
    tracker: Tracker | None = None,
    bayes_auc: float | None = None,
    case_llr: Mapping[str, float] | None = None,
    sites: Mapping[str, str] | None = None,
) -> TrainingResults:
    """Train, cross-validate and evaluate every model in ``train.models``.

    ``primary``/``paired``: feature tables (case_id, label, feature columns) of the primary source
    (what the classifier is trained and served on) and of the other mask source (only for the ICC).
    ``splits``: the ``data/splits.json`` dict (train, test, train_folds).
    ``select``, ``train``, ``evaluate``: the params sections of those names.
    Writes ``<train.out_dir>/<model>.skops``, ``selected_features.json``, ``index.json``,
    ``<train.metrics_dir>/cv_auc.json``, ``table1.json`` (+ ``table1.md``), ``delong_test.md``,
    figures and CSVs in ``train.plots_dir``. Logs a parent run ``train`` with a nested run per model
    to ``tracker``; the parent run is tagged with the registered model and its rule.
    ``registered_rule``: ``register.model`` (a name of ``train.models`` or ``best_cv``,
    :func:`choose_registered_model`). ``bayes_auc`` and ``case_llr`` ({case_id: the latents' log-likelihood ratio})
    come with a synthetic cohort: Table 1 then also states the ceiling and, when every test case
    has an LLR, the Bayes classifier's AUC on the test cases and the registered model's paired
    distance to it. ``sites`` ({case_id: site}, the manifest's site column) is required when
    ``select.harmonize.enabled`` (ComBat reads it) and unused otherwise. When ``splits`` hold
    ``groups`` (patients), the tuning folds are grouped by patient too.
    """
    tracker = tracker or NullTracker()
    if registered_rule != BEST_CV and registered_rule not in train.models:
        raise TrainingInputError(f"register.model '{registered_rule}' is not in train.models {train.models}")
    if select.harmonize.enabled and not sites:
        raise TrainingInputError(
            "select.harmonize.enabled: ComBat needs each case's site, and the manifest has no site column "
            "(add one, or set select.harmonize.enabled false)"
        )
    data = _training_data(primary, paired, splits, select.icc.paired_prefix,
                          sites if select.harmonize.enabled else None)
    Path(train.out_dir).mkdir(parents=True, exist_ok=True)
    results: dict[str, ModelResult] = {}
    with tracker.run("train", tags={"stage": "train", "feature_source": feature_source}) as train_run_id:
        tracker.log_params({"seed": seed, "feature_source": feature_source, "n_train": len(data.train_ids),
                            "n_test": len(data.test_ids), "n_features": len(data.primary_cols),
                            "select": select.model_dump(mode="json"), "inner_folds": train.inner_folds,
                            "outer_folds": len(data.outer), "tuning_storage": _without_password(train.tuning.storage),
                            "tuning_workers": train.tuning.workers})
        inner, outer = precompute_selection(data, select, train.inner_folds, seed, tracker)
        for model in progress(train.models, desc="models", unit="model"):
            with tracker.run(model, tags={"model": model}, nested=True) as model_run_id:
                results[model] = fit_model(model, data, inner, outer, select=select, train=train,
                                           evaluate=evaluate, seed=seed, tracker=tracker)
                _record_model(results[model], data, train=train, evaluate=evaluate, tracker=tracker)
                results[model].run_id = model_run_id
        cv_aucs = {m: r.cv_aucs for m, r in results.items()}
        best = choose_best_model(cv_aucs, train.models)
        registered = choose_registered_model(registered_rule, cv_aucs, train.models)
        log.info("registered model %s (%s); best by CV: %s", registered, registered_rule_text(registered_rule), best)
        reference = _bayes_reference(data, results[registered], case_llr, evaluate)
        selected, table = _write_outputs(results, best, data, registered=registered, rule=registered_rule,
                                         feature_source=feature_source, train=train, evaluate=evaluate,
                                         bayes_auc=bayes_auc, reference=reference, tracker=tracker,
                                         train_run_id=train_run_id)
    return TrainingResults(results, best, registered, selected, table, {"train": data.y_train, "test": data.y_test})


def _log_model(tracker: Tracker, pipeline: Any, input_example: pd.DataFrame) -> None:
    """Log the fitted pipeline as an MLflow sklearn model (skops format, its types trusted).

    The signature is inferred by MLflow from ``input_example`` and the pipeline's ``predict``
    (labels); ``mlflow.sklearn.load_model`` gives back the pipeline with ``predict_proba``. The
    served model (probability + label, input checks) is the pyfunc the register stage logs.
    The ``bonemet`` package must be importable where the model is loaded (our transformers).
    """
    import importlib.metadata as md

    reqs = []
    for dist in ("scikit-learn", "xgboost", "lightgbm", "skops", "pandas", "numpy", "scipy"):
        try:
            reqs.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:  # pragma: no cover - xgboost-cpu is named differently
            if dist == "xgboost":
                try:
                    reqs.append(f"xgboost=={md.version('xgboost-cpu')}")
                except md.PackageNotFoundError:
                    pass
    tracker.log_model(
        pipeline,
        name="model",
        flavor="sklearn",
        input_example=input_example,
        pip_requirements=reqs,
        serialization_format="skops",
        skops_trusted_types=trusted_types(pipeline),
    )


def display_name(model: str) -> str:
    """Display name of a model for tables and figures."""
    return DISPLAY_NAMES.get(model, model)


def write_training_domains(pipelines: Mapping[str, Any], primary: pd.DataFrame, splits: Mapping[str, Any],
                           train: TrainSpec, *, validation_report: str | Path, seed: int,
                           sites: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Fit and write each model's training domain (``<model>.domain.skops``, ``domain.json``).

    The domain is fitted on the training cases of ``splits`` as a served row holds them (the
    primary source's feature columns, and the ``site`` from ``sites`` (case id -> site) when the
    pipeline harmonises per site), its threshold calibrated over ``splits``' ``train_folds``;
    spacing and intensity ranges come from ``validation_report`` (the validate stage's) when it exists.
    """
    import json

    from bonemet.modeling.domain import domain_file, fit_training_domain, report_measures

    spec = train.domain
    table = primary.set_index(primary[ID_COLUMN].astype(str))
    train_ids = [str(i) for i in splits["train"]]
    X = table.loc[train_ids, feature_columns(primary)].astype(np.float64)
    if sites is not None:
        from bonemet.data.manifest import SITE_COLUMN

        X[SITE_COLUMN] = [str(sites[i]) for i in train_ids]
    folds = [int(splits["train_folds"][i]) for i in train_ids]
    report = Path(validation_report)
    images = None
    if report.is_file():
        images = report_measures(json.loads(report.read_text(encoding="utf-8")), train_ids)
    else:
        log.warning("no validation report at %s: the models' domain has no spacing or intensity range", report)
    out_dir = Path(train.out_dir)
    summary = {}
    for name, pipeline in pipelines.items():
        domain = fit_training_domain(pipeline, X, folds, spec, seed=seed, images=images)
        save_pipeline(domain, out_dir / domain_file(name))
        summary[name] = domain.summary()
        log.info("%s: training domain (%s) flags %.1f %% of training cases out of fold", name, spec.method,
                 100 * domain.oof_flag_rate_)
    write_json(out_dir / "domain.json", summary)
    return summary
