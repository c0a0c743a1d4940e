"""Optuna studies in a shared storage (params train.tuning): two processes tune one study, each
trial is logged once, a rerun resumes the study instead of starting over."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from bonemet.config import ParamsError, build_specs, load_params
from bonemet.modeling.tuning import WORKER_ATTR, precompute_folds, study_name, tune_model
from bonemet.tracking.base import RecordingTracker
from postgres import postgres_server, skip_reason

N_TRIALS = 6


@pytest.fixture(scope="module")
def folds(params):
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8))
    y = (X[:, 0] - X[:, 1] + 0.5 * rng.normal(size=60) > 0).astype(int)
    cols = [f"f{i}" for i in range(8)]
    frame = pd.concat([pd.DataFrame(X, columns=cols),
                       pd.DataFrame(X + 0.05 * rng.normal(size=X.shape), columns=[f"paired__{c}" for c in cols])],
                      axis=1)
    select = params.select.updated({"lasso.max_features": 4, "lasso.cv": 3})
    splits = list(StratifiedKFold(3, shuffle=True, random_state=0).split(frame, y))
    return precompute_folds(frame, y, splits, select, seed=0)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def storage(request, tmp_path_factory):
    """A fresh database URL per storage kind: SQLite (always), PostgreSQL (when its binaries are here)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('optuna') / 'optuna.db'}"
        return
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with postgres_server(("optuna",)) as urls:
        yield urls["optuna"]


def _tune(params, folds, storage, *, n_trials=N_TRIALS, workers=2, seed=5, tracker=None):
    return tune_model("logreg", folds, params.train.search_space["logreg"], n_trials, seed,
                      fixed_params=params.train.fixed_params["logreg"],
                      pruner_startup_trials=params.train.pruner_startup_trials, storage=storage, workers=workers,
                      tracker=tracker)


def test_two_workers_tune_one_study_and_each_trial_is_logged_once(params, folds, storage):
    import optuna

    tracker = RecordingTracker()
    with tracker.run("logreg"):
        result = _tune(params, folds, storage, tracker=tracker)
    name = study_name("logreg", folds, params.train.search_space["logreg"], params.train.fixed_params["logreg"], 5,
                      params.train.pruner_startup_trials)
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(study.trials) == N_TRIALS  # the two workers' shares add up: no trial more, none less
    assert sorted(t.number for t in study.trials) == list(range(N_TRIALS))
    assert all(t.state.is_finished() for t in study.trials)
    assert result.n_trials == N_TRIALS and len(result.trials) == N_TRIALS
    logged = tracker.find("logreg")["metrics"]["trial_auc"]
    completed = {t.number: t.value for t in study.trials if t.value is not None}
    assert [step for step, _ in logged] == sorted(completed)  # each finished trial once, in trial order
    assert dict(logged) == pytest.approx(completed)
    assert result.best_value == pytest.approx(study.best_value)
    # two worker processes, neither of them this one, ran half the trials each
    workers = [t.user_attrs[WORKER_ATTR] for t in study.trials]
    assert sorted(workers.count(w) for w in set(workers)) == [N_TRIALS // 2, N_TRIALS // 2]
    assert not any(w.endswith(f":{os.getpid()}") for w in workers)

    # a rerun finds the study complete: no new trial, the same answer, each trial logged once again
    again_tracker = RecordingTracker()
    with again_tracker.run("logreg"):
        again = _tune(params, folds, storage, tracker=again_tracker)
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == N_TRIALS
    assert again.best_params == result.best_params and again.best_value == result.best_value
    assert again_tracker.find("logreg")["metrics"]["trial_auc"] == logged
    # more trials asked for: only the difference runs, in the same study
    more = _tune(params, folds, storage, n_trials=N_TRIALS + 2)
    assert more.n_trials == N_TRIALS + 2
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == N_TRIALS + 2


def test_the_study_name_follows_the_tuning_not_the_machine(params, folds):
    space, fixed = params.train.search_space["logreg"], params.train.fixed_params["logreg"]
    name = study_name("logreg", folds, space, fixed, 5, 1)
    assert name == study_name("logreg", folds, space, fixed, 5, 1)
    assert name.startswith("bonemet-logreg-")
    assert len({name, study_name("logreg", folds, space, fixed, 6, 1), study_name("svm", folds, space, fixed, 5, 1),
                study_name("logreg", folds[:2], space, fixed, 5, 1), study_name("logreg", folds, space, fixed, 5, 2),
                study_name("logreg", folds, space, {**fixed, "max_iter": 10}, 5, 1)}) == 6


def test_in_memory_tuning_is_unchanged_and_reproducible(params, folds):
    a, b = (_tune(params, folds, None, workers=1) for _ in range(2))
    assert a.best_params == b.best_params and a.n_trials == N_TRIALS


def test_workers_without_a_storage_are_refused():
    raw = load_params("params.yaml")
    raw["train"]["tuning"] = {"storage": None, "workers": 2}
    with pytest.raises(ParamsError, match=r"train.tuning: .*workers is 2: processes share a study only through a "
                                          r"storage"):
        build_specs(raw)


def test_the_storage_is_logged_without_its_password():
    from bonemet.modeling.training import _without_password

    assert _without_password("postgresql://bonemet:s3cret@db.team:5432/optuna") == \
        "postgresql://bonemet:***@db.team:5432/optuna"
    assert _without_password(None) == "memory"
