"""Tracking: the recording tracker, the MLflow backend on a throwaway SQLite store; deep_merge.

The params specs themselves (unknown, missing and invalid keys; profiles) are tested in test_config.py."""

from __future__ import annotations

from bonemet.config import deep_merge
from bonemet.tracking import RecordingTracker


def test_recording_tracker_nests_runs():
    tracker = RecordingTracker()
    with tracker.run("train", tags={"git_commit": "x"}) as train_id:
        tracker.log_params({"seed": 1})
        with tracker.run("svm") as svm_id:
            tracker.log_metrics({"cv_auc_mean": 0.9})
            tracker.log_metrics({"loss": 0.5}, step=1)
    assert tracker.find("svm")["parent"] == "train"
    assert tracker.find("svm")["metrics"]["loss"] == [(1, 0.5)]
    assert tracker.find("train")["params"] == {"seed": 1}
    assert (train_id, svm_id) == ("run-1", "run-2")  # each run yields its id, like MLflow's


def test_mlflow_tracker_writes_nested_runs_to_sqlite(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from bonemet.registry.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker

    # the library never reads the environment: with no tracking_uri it uses the store_dir given
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://no-such-server.invalid:5000")
    store = tmp_path / "mlruns"
    tracker = MlflowTracker("bonemet-test", system_metrics=False, system_metrics_interval_s=None, tracking_uri=None, store_dir=store, default_tags={"data_md5": "abc"})
    assert tracker.tracking_uri == f"sqlite:///{(store / 'mlflow.db').resolve()}"
    with tracker.run("parent") as parent_id:
        tracker.log_params({"select": {"icc": {"threshold": 0.9}}})
        with tracker.run("fold-0") as child_id:
            for epoch in range(3):
                tracker.log_metrics({"val_dice": 0.5 + epoch / 10}, step=epoch)
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["data_md5"] == "abc"
    assert [m.value for m in client.get_metric_history(child_id, "val_dice")] == [0.5, 0.6, 0.7]
    assert client.get_run(parent_id).data.params["select.icc.threshold"] == "0.9"
    assert (store / "mlflow.db").is_file()
    # artifacts go under store_dir/artifacts/<experiment>; the UI opens the experiment on its runs
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location == (store / "artifacts" / "bonemet-test").resolve().as_uri()
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_existing_experiment_gets_the_experiment_kind_tag(tmp_path):
    from bonemet.registry.store import EXPERIMENT_KIND_TAG, client, ensure_experiment

    store = client(None, tmp_path / "mlruns")
    old = store.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in store.get_experiment(old).tags
    assert ensure_experiment(store, "made-elsewhere", tmp_path / "mlruns") == old
    assert store.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_deep_merge():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    base = {"a": {"b": 1}}
    deep_merge(base, {"a": {"b": 2}})
    assert base == {"a": {"b": 1}}  # a copy: the base is unchanged


def _dataset(name="cohort", digest="d41d8cd98f00b204e9800998ecf8427e.dir", n=3):
    import pandas as pd

    from bonemet.tracking import DatasetInput

    table = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
    return DatasetInput(name=name, table=table, source="cohorts/x/manifest.csv", digest=digest, context="training",
                        tags={"n_cases": str(n)})


def test_datasets_are_recorded_buffered_and_replayed_in_order():
    from bonemet.tracking import CallBuffer, RecordingTracker, replay_calls

    buffer = CallBuffer()
    with buffer.run("fold-0", nested=True):
        buffer.log_input(_dataset())
    recorder = RecordingTracker()
    replay_calls(buffer.calls, recorder)
    [record] = recorder.runs
    assert record["inputs"] == [{"name": "cohort", "digest": "d41d8cd98f00b204e9800998ecf8427e.dir",
                                 "context": "training", "source": "cohorts/x/manifest.csv", "n_rows": 3,
                                 "tags": {"n_cases": "3"}}]


def test_mlflow_tracker_logs_its_datasets_on_every_run_and_the_stage_log(tmp_path):
    from mlflow.tracking import MlflowClient

    from bonemet.registry.store import MlflowTracker
    from bonemet.utils import capture_warnings

    tracker = MlflowTracker("bonemet-test", system_metrics=False, system_metrics_interval_s=None, tracking_uri=None, store_dir=tmp_path / "mlruns",
                            inputs=[_dataset(), _dataset("features-auto", "0123456789abcdef0123456789abcdef", 5)])
    log_file = tmp_path / "logs" / "train.log"
    with capture_warnings(log_file, "train"):
        with tracker.run("train") as parent_id:
            with tracker.run("svm") as child_id:
                import warnings

                warnings.warn("a library note", UserWarning, stacklevel=1)
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    for run_id in (parent_id, child_id):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        by_name = {d.dataset.name: d for d in inputs}
        assert set(by_name) == {"cohort", "features-auto"}
        assert by_name["cohort"].dataset.digest == "d41d8cd98f00b204e9800998ecf8427e.dir"
        assert {t.key: t.value for t in by_name["features-auto"].tags}["n_cases"] == "5"
        assert "file://" in by_name["cohort"].dataset.source
    # the stage's log (the warning in full) and the warning count go to the top-level run only
    assert [a.path for a in client.list_artifacts(parent_id, "logs")] == ["logs/train.log"]
    assert client.get_run(parent_id).data.metrics["warnings"] == 1.0
    assert "warnings" not in client.get_run(child_id).data.metrics


def test_two_trackers_on_two_stores_alternately_keep_to_their_own_and_leave_no_mlflow_state(tmp_path):
    """Each tracker names its store, experiment and run on every call: used alternately in one
    process (runs nested across them, models logged and registered in both), each store holds its
    own runs, models and versions only; afterwards MLflow has no active run, no active experiment
    and the same global URIs, also after a model that failed to log."""
    import os

    import mlflow
    import numpy as np
    import pytest
    from mlflow.tracking import fluent
    from sklearn.linear_model import LogisticRegression

    from bonemet.registry.store import MlflowTracker, alias_version, load_model, register_model, set_alias

    def tracker(store):
        return MlflowTracker("bonemet-test", tracking_uri=None, store_dir=tmp_path / store, system_metrics=False,
                             system_metrics_interval_s=None)

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), fluent._active_experiment_id,
              os.environ.get("MLFLOW_TRACKING_URI"))
    a, b = tracker("a"), tracker("b")
    model = LogisticRegression().fit(np.arange(8.0).reshape(4, 2), [0, 1, 0, 1])
    ids, infos = {"a": [], "b": []}, {}
    with a.run("a-parent") as run_a:
        ids["a"].append(run_a)
        with b.run("b-parent") as run_b:  # b's own top-level run, not a child of a's
            ids["b"].append(run_b)
            a.log_params({"store": "a"})
            b.log_params({"store": "b"})
            with a.run("a-child") as child_a:
                ids["a"].append(child_a)
                infos["a"] = a.log_model(model, "model")
                b.log_metrics({"m": 2.0})
                infos["b"] = b.log_model(model, "model")
                a.log_metrics({"m": 1.0})
                with pytest.raises(TypeError):
                    b.log_model(model, "broken", no_such_argument=1)
                assert mlflow.active_run() is None
    for name, own, other in (("a", a, b), ("b", b, a)):
        assert {r.info.run_id for r in own.client.search_runs([own.experiment_id])} == set(ids[name])
        for run_id in ids[name]:
            with pytest.raises(mlflow.exceptions.MlflowException):
                other.client.get_run(run_id)
        info = infos[name]
        assert info.run_id == {"a": child_a, "b": run_b}[name]  # the run open in that tracker
        assert own.client.get_logged_model(info.model_id).experiment_id == own.experiment_id
        set_alias(own.client, "m", "staging", register_model(own.client, info, "m"))
        assert load_model(own.client, "models:/m@staging", flavor="sklearn").predict([[0.0, 1.0]]).shape == (1,)
    assert a.client.get_run(ids["a"][1]).data.tags["mlflow.parentRunId"] == ids["a"][0]
    assert "mlflow.parentRunId" not in b.client.get_run(ids["b"][0]).data.tags
    assert a.client.get_run(ids["a"][0]).data.params == {"store": "a"}
    assert b.client.get_run(ids["b"][0]).data.params == {"store": "b"}
    assert alias_version(a.client, "m", "staging") == alias_version(b.client, "m", "staging") == "1"
    assert mlflow.active_run() is None
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), fluent._active_experiment_id,
            os.environ.get("MLFLOW_TRACKING_URI")) == before
