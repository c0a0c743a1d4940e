"""Registry, promotion gate, the served pyfunc's input checks, and a real `mlflow models serve`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bonemet.serving import FeatureInputError, check_feature_frame, decide_promotion

FEATURES = [f"original_firstorder_F{i}" for i in range(6)]


def _table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, len(FEATURES))) + y[:, None] * np.linspace(0, 1.5, len(FEATURES))
    df = pd.DataFrame(X, columns=FEATURES)
    df.insert(0, "case_id", [f"case_{i:03d}" for i in range(n)])
    df.insert(1, "label", y)
    return df


def test_gate_rules():
    assert decide_promotion(0.9, None, min_auc=0.7, tolerance=0.02).promote
    assert not decide_promotion(0.6, None, min_auc=0.7, tolerance=0.02).promote
    held = decide_promotion(0.80, 0.85, min_auc=0.7, tolerance=0.02)
    assert not held.promote and "worse than staging" in held.reason
    assert decide_promotion(0.84, 0.85, min_auc=0.7, tolerance=0.02).promote
    assert not decide_promotion(float("nan"), 0.85, min_auc=0.7, tolerance=0.02).promote


def test_feature_checks_name_the_problem():
    df = _table(4)
    out = check_feature_frame(df, FEATURES)
    assert list(out.columns) == FEATURES and out.dtypes.unique().tolist() == [np.float64]
    with pytest.raises(FeatureInputError, match="empty input"):
        check_feature_frame(df.iloc[:0], FEATURES)
    with pytest.raises(FeatureInputError, match="missing 1 of 6 feature columns: original_firstorder_F2"):
        check_feature_frame(df.drop(columns=[FEATURES[2]]), FEATURES)
    with pytest.raises(FeatureInputError, match="unknown columns: bogus"):
        check_feature_frame(df.assign(bogus=1.0), FEATURES)
    bad = df.copy()
    bad[FEATURES[1]] = bad[FEATURES[1]].astype(object)
    bad.loc[2, FEATURES[1]] = "abc"
    with pytest.raises(FeatureInputError, match=f"non-numeric.*'{FEATURES[1]}' at row\\(s\\) 2"):
        check_feature_frame(bad, FEATURES)
    nan = df.copy()
    nan.loc[3, FEATURES[4]] = np.nan
    with pytest.raises(FeatureInputError, match=f"NaN or infinite.*{FEATURES[4]}.*row\\(s\\) 3"):
        check_feature_frame(nan, FEATURES)


@pytest.fixture
def store(tmp_path, monkeypatch):
    from bonemet.tracking.mlflow_backend import configure

    monkeypatch.chdir(tmp_path)
    uri = configure(None, tmp_path / "mlruns")
    return uri


def _fake_train_run(experiment, aucs):
    """A parent `train` run with one nested run per model, each with a logged sklearn pipeline."""
    import mlflow

    from bonemet.tracking.mlflow_backend import ensure_experiment

    exp_id = ensure_experiment(experiment, "mlruns")
    df = _table()
    with mlflow.start_run(run_name="train", experiment_id=exp_id):
        for name, (cv_auc, test_auc) in aucs.items():
            with mlflow.start_run(run_name=name, nested=True, experiment_id=exp_id, tags={"model": name}):
                pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(df[FEATURES], df["label"])
                mlflow.sklearn.log_model(pipe, name="model", serialization_format="skops",
                                         pip_requirements=["scikit-learn"])
                mlflow.log_metrics({"cv_auc_mean": cv_auc, "test_auc": test_auc})
    return df


def _register(df, **kw):
    from bonemet.tracking.registry import register_best_classifier

    args = dict(experiment="bonemet-classification", model_name="bonemet-classifier", input_example=df.head(2),
                feature_names=FEATURES, threshold=0.5, min_auc=0.7, tolerance=0.02, alias="staging",
                pip_requirements=["scikit-learn==1.9.1"], tags={"data_md5": "d41d8", "git_commit": "abc"})
    args.update(kw)
    return register_best_classifier(**args)


def test_register_best_gate_and_pyfunc_input_checks(store):
    import mlflow
    from mlflow.exceptions import MlflowException

    from bonemet.tracking.mlflow_backend import alias_version, model_versions

    df = _fake_train_run("bonemet-classification", {"svm": (0.93, 0.90), "knn": (0.85, 0.95)})
    first = _register(df)
    assert first.classifier == "svm" and first.promoted and first.version == "1"
    assert alias_version("bonemet-classifier", "staging") == "1"
    [v1] = model_versions("bonemet-classifier")
    assert "test AUC 0.900" in v1["description"] and v1["tags"]["data_md5"] == "d41d8"
    assert v1["aliases"] == ["staging"]

    # A worse new version is registered but does not take the alias.
    _fake_train_run("bonemet-classification", {"svm": (0.90, 0.80)})
    second = _register(df)
    assert second.version == "2" and not second.promoted
    assert alias_version("bonemet-classifier", "staging") == "1"

    model = mlflow.pyfunc.load_model("models:/bonemet-classifier@staging")
    out = model.predict(df.head(3))
    assert list(out.columns) == ["case_id", "probability_breast", "label"]
    assert ((out["probability_breast"] >= 0) & (out["probability_breast"] <= 1)).all()
    assert set(out["label"]) <= {0, 1}
    nan = df.head(2).copy()
    nan.loc[0, FEATURES[0]] = np.nan
    with pytest.raises(MlflowException, match="NaN"):
        model.predict(nan)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, payload: bytes | str):
    data = payload.encode() if isinstance(payload, str) else payload
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.slow
def test_mlflow_models_serve_answers_4xx_on_bad_input_and_keeps_serving(store, tmp_path):
    df = _fake_train_run("bonemet-classification", {"svm": (0.93, 0.90)})
    _register(df)
    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/bonemet-classifier@staging",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            pytest.fail("server did not start: " + (tmp_path / "serve.log").read_text()[-2000:])
        good = json.dumps({"dataframe_split": df[FEATURES].head(3).to_dict(orient="split")})
        status, body = _post(port, good)
        assert status == 200, body
        assert len(body["predictions"]) == 3 and {"probability_breast", "label"} <= set(body["predictions"][0])
        wrong = df[FEATURES].head(2).rename(columns={FEATURES[0]: "bogus"})
        strings = df[FEATURES].head(2).astype(object)
        strings.iloc[0, 1] = "abc"
        nan_rows = json.loads(good)
        nan_rows["dataframe_split"]["data"][0][0] = None
        bad_payloads = {
            "wrong columns": json.dumps({"dataframe_split": wrong.to_dict(orient="split")}),
            "missing features": json.dumps({"dataframe_split": df[FEATURES[:3]].head(2).to_dict(orient="split")}),
            "NaN": json.dumps(nan_rows),
            "strings": json.dumps({"dataframe_split": strings.to_dict(orient="split")}),
            "empty body": "",
            "not JSON": "{{{",
        }
        for what, payload in bad_payloads.items():
            status, body = _post(port, payload)
            assert 400 <= status < 500, f"{what}: HTTP {status}: {body}"
        status, body = _post(port, good)  # still serving
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
