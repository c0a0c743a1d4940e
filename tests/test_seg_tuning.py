"""Segmentation tuning (segment.tune) makes its study as the classifiers' tuning does (bonemet.search):
seeded TPE (the same seed gives the same trials), a median pruner on the best validation Dice per
epoch, and a storage in which the study is resumed. Training is replaced by a scripted one."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

import bonemet.segmentation.training as training
from bonemet.tracking.base import RecordingTracker


@pytest.fixture
def scripted(monkeypatch):
    """``train_model`` replaced: five epochs whose Dice rises to a score of the trial's values."""
    calls: list[tuple] = []

    def fake(model, train_items, val_items, spec, *, seed, tracker=None, on_epoch=None, **kwargs):
        t = spec.train
        score = 0.9 - abs(math.log10(t.lr) + 2.3) * 0.1 - 0.01 * t.batch_size + 0.0001 * t.max_epochs
        best, epochs = 0.0, 0
        for epoch in range(1, 6):
            best, epochs = max(best, score * epoch / 5), epoch
            if on_epoch is not None and on_epoch(epoch, best):
                break
        calls.append((t.lr, t.batch_size, t.max_epochs, epochs))
        return SimpleNamespace(best_val_dice=best)

    monkeypatch.setattr(training, "train_model", fake)
    return calls


def _tune(params, n_trials, seed=7, tracker=None, **tune):
    spec = params.segment.updated({"tune.n_trials": n_trials, **{f"tune.{k}": v for k, v in tune.items()}})
    return training.tune(lambda: None, [], [], spec, seed=seed, tracker=tracker)


def test_in_memory_tuning_is_reproducible_and_the_profiles_trials_run_whole(params, scripted):
    first = _tune(params, 5)
    trials = list(scripted)
    scripted.clear()
    assert _tune(params, 5) == first and scripted == trials
    assert all(epochs == 5 for *_, epochs in trials)  # n_trials within pruner_startup_trials: nothing pruned
    scripted.clear()
    _tune(params, 5, seed=8)
    assert scripted != trials


def test_the_pruner_stops_poor_trials_after_the_startup_trials(params, scripted):
    tracker = RecordingTracker()
    with tracker.run("segment"):
        best = _tune(params, 12, tracker=tracker, pruner_startup_trials=3)
    epochs = [e for *_, e in scripted]
    assert epochs[:3] == [5, 5, 5] and min(epochs[3:]) < 5  # pruned ones stopped early
    assert set(best) == {"lr", "batch_size", "max_epochs"}


def test_a_study_in_a_storage_is_resumed(params, scripted, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = _tune(params, 3, storage=storage)
    assert len(scripted) == 3
    assert _tune(params, 3, storage=storage) == first and len(scripted) == 3  # nothing left to run
    _tune(params, 5, storage=storage)
    assert len(scripted) == 5  # raising n_trials continues the study


def test_the_study_name_follows_the_settings_seed_and_cases(params):
    spec = params.segment.updated({"tune.n_trials": 3})
    items = [{"case_id": "a", "image": np.zeros((1, 2, 2, 2), np.float32), "label": np.zeros((1, 2, 2, 2), np.uint8)}]
    other = [{**items[0], "image": np.ones((1, 2, 2, 2), np.float32)}]
    name = training.tuning_study_name(spec, items, items, 7)
    assert name == training.tuning_study_name(spec.updated({"tune.n_trials": 9}), items, items, 7)
    assert len({name, training.tuning_study_name(spec, items, items, 8),
                training.tuning_study_name(spec, other, items, 7),
                training.tuning_study_name(spec.updated({"train.lr": 0.5}), items, items, 7)}) == 4


def test_the_storage_is_logged_and_saved_without_its_password(params):
    spec = params.segment.updated({"tune.storage": "postgresql://bonemet:s3cret@db.team:5432/optuna"})
    doc = training.spec_json(spec)
    assert doc["tune"]["storage"] == "postgresql://bonemet:***@db.team:5432/optuna"
    assert "s3cret" not in str(doc) and training.spec_json(params.segment)["tune"]["storage"] is None
