"""Optuna tuning of one classifier by inner stratified cross-validation on the training set.

Speed without leakage: the selection part of the pipeline (ICC, correlation filter, scaler,
LASSO CV) does not depend on the classifier's hyperparameters, so it is fitted once per inner
fold on that fold's training rows (:func:`precompute_folds`) and reused by every trial of every
model. Each trial then fits only the classifier on the fold's selected features. This is the
same computation as refitting the whole pipeline per fold and trial (selection is seeded and
deterministic), at a fraction of the cost.

Objective: mean inner-fold ROC AUC. The running mean is reported after each fold so the
``MedianPruner`` can stop hopeless trials early. Sampler: TPE, seeded: the same seed gives the
same trials. In memory by default; with ``train.tuning.storage`` (PostgreSQL) each model's study
lives in the database under a deterministic name and several processes (``train.tuning.workers``)
or machines tune it at once. The studies are made by :mod:`bonemet.search` (the one home of
Optuna), as segmentation's tuning's are.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bonemet.modeling.classifiers import build_classifier
from bonemet.modeling.pipeline import build_selection_pipeline
from bonemet.search import (
    finished_trials,
    is_pruned,
    load_study,
    make_study,
    optimize,
    prune,
    remaining_trials,
    space_json,
    study_digest,
    suggest,
    trials_frame,
)
from bonemet.tracking import NullTracker, Tracker
from bonemet.utils import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import Choice, FloatRange, IntRange, SelectSpec

log = logging.getLogger(__name__)


@dataclass
class FoldData:
    """One inner fold after selection: classifier inputs for training and validation rows."""

    X_train: pd.DataFrame
    y_train: np.ndarray
    X_val: pd.DataFrame
    y_val: np.ndarray


@dataclass
class TuningResult:
    """Outcome of tuning one model."""

    model: str
    best_params: dict[str, Any]
    best_value: float
    n_trials: int
    n_pruned: int
    trials: pd.DataFrame = field(repr=False)
    #: the study's name in the shared storage (``train.tuning.storage``); None for an in-memory study
    study: str | None = None


def precompute_folds(
    X: pd.DataFrame,
    y: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    select: SelectSpec,
    seed: int,
) -> list[FoldData]:
    """Fit the selection part on each fold's training rows and transform its validation rows.

    ``splits`` are ``(train_idx, val_idx)`` positional index pairs into ``X``.
    """
    folds = []
    y = np.asarray(y)
    for train_idx, val_idx in splits:
        selection = build_selection_pipeline(select, seed)
        X_tr = selection.fit_transform(X.iloc[train_idx], y[train_idx])
        X_va = selection.transform(X.iloc[val_idx])
        folds.append(FoldData(X_tr, y[train_idx], X_va, y[val_idx]))
    return folds


def fold_scores(model_name: str, params: Mapping[str, Any], fold: FoldData, seed: int) -> np.ndarray:
    """Fit classifier ``model_name`` on a fold's selected training rows; its probabilities of label 1
    on the fold's validation rows."""
    clf = build_classifier(model_name, params, seed)
    clf.fit(fold.X_train, fold.y_train)
    return clf.predict_proba(fold.X_val)[:, 1]


def fold_auc(model_name: str, params: Mapping[str, Any], fold: FoldData, seed: int) -> float:
    """Fit classifier ``model_name`` on a fold's selected training rows; ROC AUC on its validation rows."""
    from sklearn.metrics import roc_auc_score

    proba = fold_scores(model_name, params, fold, seed)
    if len(np.unique(fold.y_val)) < 2:
        raise ValueError(f"inner fold with {len(fold.y_val)} validation rows holds one class only")
    return float(roc_auc_score(fold.y_val, proba))


def study_name(model_name: str, folds: Sequence[FoldData], space: Mapping[str, Any], fixed_params: Mapping[str, Any],
               seed: int, pruner_startup_trials: int) -> str:
    """The study's name in a shared storage: the model, then a digest of everything that defines its
    trials (search space, fixed params, seed, pruner, the tuning folds' selected data).

    The same tuning gets the same name on any machine (so a rerun resumes it), a change of data or
    settings a new study. ``n_trials`` is not part of it: raising it continues the study.
    """
    spec = {"model": model_name, "seed": int(seed), "pruner_startup_trials": int(pruner_startup_trials),
            "fixed": dict(fixed_params), "space": space_json(space)}
    chunks = []
    for fold in folds:
        for frame in (fold.X_train, fold.X_val):
            chunks.append("\0".join(map(str, frame.columns)).encode())
            chunks.append(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
        for labels in (fold.y_train, fold.y_val):
            chunks.append(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return f"bonemet-{model_name}-{study_digest(spec, *chunks)}"


#: the trial's user attribute naming the process that ran it (``host:pid``)
WORKER_ATTR = "bonemet_worker"


class _Objective:
    """Mean inner-fold AUC of one trial's hyperparameters, reported fold by fold for the pruner
    (a class, not a closure, so that worker processes receive it)."""

    def __init__(self, model_name: str, folds: Sequence[FoldData], space: Mapping[str, Any],
                 fixed: Mapping[str, Any], seed: int) -> None:
        self.model_name, self.folds, self.space, self.fixed, self.seed = model_name, list(folds), dict(space), dict(fixed), seed

    def __call__(self, trial: Any) -> float:
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")  # which process ran it
        params = {**self.fixed, **suggest(trial, self.space)}
        scores = []
        for step, fold in enumerate(self.folds):
            scores.append(fold_auc(self.model_name, params, fold, self.seed))
            prune(trial, float(np.mean(scores)), step)  # raises the pruner's stop
        return float(np.mean(scores))


def _optimize_share(storage: str, name: str, objective: _Objective, seed: int, pruner_startup_trials: int,
                    n_trials: int, warnings_log: str | None) -> int:
    """A worker process (one BLAS/OpenMP thread): ``n_trials`` trials of the shared study
    ``name``, its own database connection; returns how many it ran."""
    from threadpoolctl import threadpool_limits

    from bonemet.utils import log_context, worker_warnings

    with threadpool_limits(limits=1), worker_warnings(warnings_log), \
            log_context(f"[{objective.model_name} tuning, sampler seed {seed}]"):
        study = load_study(name, seed=seed, pruner_startup_trials=pruner_startup_trials, storage=storage)
        optimize(study, objective, n_trials)
    return n_trials


#: what the tuning workers import anyway, loaded once in the forkserver process
_WORKER_PRELOAD = ("bonemet.modeling.tuning", "bonemet.search", "optuna", "sklearn.linear_model", "sklearn.svm",
                   "sklearn.neighbors", "sklearn.ensemble", "sklearn.neural_network", "sqlalchemy")


def _shares(n: int, workers: int) -> list[int]:
    """``n`` trials split over ``workers`` as evenly as possible (zeros dropped)."""
    return [k for k in (n // workers + (i < n % workers) for i in range(workers)) if k > 0]


def log_trials(tracker: Tracker, trials: Sequence[Any]) -> None:
    """Each finished trial's AUC as metric ``trial_auc`` (step = trial number), once per trial."""
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.value is not None:
            tracker.log_metrics({"trial_auc": float(trial.value)}, step=int(trial.number))


def tune_model(
    model_name: str,
    folds: Sequence[FoldData],
    space: Mapping[str, FloatRange | IntRange | Choice],
    n_trials: int,
    seed: int,
    *,
    fixed_params: Mapping[str, Any],
    pruner_startup_trials: int,
    storage: str | None,
    workers: int,
    tracker: Tracker | None = None,
) -> TuningResult:
    """Tune ``model_name`` with Optuna TPE (seeded) and a median pruner over precomputed folds.

    ``fixed_params`` are passed to every trial unchanged (not searched). With an empty search
    space or ``n_trials`` < 1 the fixed params are returned untuned (``best_value`` then is the
    CV AUC of those params).

    ``storage`` None: an in-memory study in this process (the same seed gives the same trials).
    A database URL (``train.tuning.storage``): the study :func:`study_name` names in that storage,
    created or resumed: the finished trials already there count towards ``n_trials``, and the rest
    run in ``workers`` processes at once (worker ``i`` samples with seed ``seed + i``; started from
    a forkserver, never forked from this process and its database connections), which
    coordinate through the database only (another machine tuning the same study at once counts the
    finished trials when it starts, so together they may exceed ``n_trials``). Parallel TPE is not
    reproducible trial by trial.

    Every finished trial is logged to ``tracker`` once, after tuning, from the study itself
    (metric ``trial_auc``, step = trial number).
    """
    tracker = tracker or NullTracker()
    fixed = dict(fixed_params)
    if not space or n_trials < 1:
        aucs = [fold_auc(model_name, fixed, fold, seed) for fold in folds]
        return TuningResult(model_name, fixed, float(np.mean(aucs)), 0, 0, pd.DataFrame())
    if workers > 1 and storage is None:
        raise ValueError(f"{workers} tuning workers need a shared storage (train.tuning.storage)")

    objective = _Objective(model_name, folds, space, fixed, seed)
    name = None if storage is None else study_name(model_name, folds, space, fixed, seed, pruner_startup_trials)
    study = make_study(name or f"bonemet-{model_name}", seed=seed, pruner_startup_trials=pruner_startup_trials,
                       storage=storage)
    if storage is None:
        with progress_bar(int(n_trials), desc=f"{model_name} trials", unit="trial") as bar:
            optimize(study, objective, int(n_trials), callbacks=[lambda _study, _trial: bar.update(1)])
    else:
        done = len(finished_trials(study))
        shares = _shares(remaining_trials(study, n_trials), workers)
        log.info("%s: study %s in the shared storage: %d trial(s) finished, %d to run in %d process(es)",
                 model_name, name, done, sum(shares), len(shares))
        with progress_bar(sum(shares), desc=f"{model_name} trials", unit="trial") as bar:
            if len(shares) == 1:
                optimize(study, objective, shares[0], callbacks=[lambda _study, _trial: bar.update(1)])
            elif shares:
                import multiprocessing

                from bonemet.utils import active_warnings_log

                # forkserver, not fork: a forked child would share this process's database connections.
                # The server process starts once with the tuning modules loaded and forks every model's
                # workers from there (seconds less per model than spawning them afresh).
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(list(_WORKER_PRELOAD))
                warnings_log = active_warnings_log()
                with ProcessPoolExecutor(max_workers=len(shares), mp_context=context) as pool:
                    futures = [pool.submit(_optimize_share, storage, name, objective, seed + i, pruner_startup_trials,
                                           share, str(warnings_log) if warnings_log else None)
                               for i, share in enumerate(shares)]
                    for future in as_completed(futures):
                        bar.update(future.result())
    finished = finished_trials(study)
    log_trials(tracker, finished)
    trials = trials_frame(study, finished)
    n_pruned = sum(is_pruned(t) for t in finished)
    best = {**fixed, **study.best_params}
    log.info("%s: best inner-CV AUC %.3f after %d trials (%d pruned)", model_name, study.best_value,
             len(finished), n_pruned)
    return TuningResult(model_name, best, float(study.best_value), len(finished), n_pruned, trials, study=name)
