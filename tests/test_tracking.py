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
    tracker = MlflowTracker("bonemet-test", tracking_uri=None, store_dir=store, default_tags={"data_md5": "abc"})
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
    import mlflow

    from bonemet.registry.store import EXPERIMENT_KIND_TAG, configure, ensure_experiment

    configure(None, tmp_path / "mlruns")
    old = mlflow.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in mlflow.get_experiment(old).tags
    assert ensure_experiment("made-elsewhere", tmp_path / "mlruns") == old
    assert mlflow.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_deep_merge():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    base = {"a": {"b": 1}}
    deep_merge(base, {"a": {"b": 2}})
    assert base == {"a": {"b": 1}}  # a copy: the base is unchanged
