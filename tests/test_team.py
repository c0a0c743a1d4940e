"""The pipeline as a team runs it: PostgreSQL, an MLflow server with basic-auth, Optuna workers, Dask.

One PostgreSQL server (Debian's binaries, loopback, a temporary folder; tests/postgres.py) holds
three databases: MLflow's backend store, MLflow's basic-auth users, and the Optuna studies. An
``mlflow server --app-name basic-auth --serve-artifacts`` runs on it; the test checks that a
request without credentials (or with a wrong password) is refused with 401, creates a user as the
admin, and runs the real DVC DAG up to the train stage (ci/smoke.sh on the tiny smoke cohort) as that
user (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``), with preprocess and
extract on a Dask ``LocalCluster`` of two worker processes (``compute.scheduler: dask``) and every
model's study tuned by two processes at once (``train.tuning``). Then, through the server's REST
API and Optuna's storage: every study holds exactly its trials, every finished trial is logged
once in its model's run, each stage and model run exists once, and the artifacts sit in the
server's artifact store. Last, the outputs go to a DVC remote (a local folder) and a fresh clone
pulls them: DVC finds the pipeline up to date, nothing recomputes. Skipped, saying why, only where
the PostgreSQL binaries are missing.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from mlflow_server import mlflow_server
from postgres import postgres_server, skip_reason

REPO = Path(__file__).resolve().parents[1]
MODELS = ["logreg", "knn", "random_forest"]
N_TRIALS = 4

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]


def _call(url: str, endpoint: str, auth: tuple[str, str] | None, body: dict | None = None, **query: str):
    """One MLflow REST call; returns (HTTP status, parsed JSON or text)."""
    target = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(target, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _api(url: str, endpoint: str, auth: tuple[str, str], body: dict | None = None, **query: str) -> dict:
    status, payload = _call(url, endpoint, auth, body, **query)
    assert status == 200, (endpoint, status, payload)
    return payload


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """PostgreSQL + an authenticated MLflow server on it; yields (url, urls of the databases, admin, root)."""
    with postgres_server(("mlflow", "mlflow_auth", "optuna")) as urls:
        root = tmp_path_factory.mktemp("server")
        admin = ("admin", secrets.token_urlsafe(16))
        ini = root / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = {urls['mlflow_auth']}\nadmin_username = {admin[0]}\n"
                       f"admin_password = {admin[1]}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        args = ["--app-name", "basic-auth", "--backend-store-uri", urls["mlflow"], "--serve-artifacts",
                "--artifacts-destination", str(root / "artifacts")]
        env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
        with mlflow_server(root, args, env) as url:
            yield url, urls, admin, root


@pytest.fixture(scope="module")
def team_run(team, tmp_path_factory):
    """The DVC DAG run by an authenticated user against the team server, Optuna workers and Dask."""
    distributed = pytest.importorskip("distributed")
    url, urls, admin, server_root = team
    user = ("alice", secrets.token_urlsafe(16))
    _api(url, "users/create", admin, {"username": user[0], "password": user[1]})
    root = tmp_path_factory.mktemp("team")
    work = root / "work"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1") as cluster:
        extra = root / "team_params.yaml"
        extra.write_text(yaml.safe_dump({
            "compute": {"scheduler": "dask", "dask_address": cluster.scheduler_address, "dask_connect_timeout_s": 30},
            # what this test checks is the trials and runs: no per-model MLflow models or figures (a minute)
            "train": {"models": MODELS, "n_trials": dict.fromkeys(MODELS, N_TRIALS), "log_models": False,
                      "log_figures": False, "tuning": {"storage": urls["optuna"], "workers": 2}},
            "register": {"model": "best_cv"},  # the SVM (the default) is not among these models
            # the second reader's masks stand in for a segmentation network's (no training: seconds)
            "segment": {"model": "external", "external": {"masks_dir": "annotator_masks", "label": 2}},
        }))
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": user[0],
               "MLFLOW_TRACKING_PASSWORD": user[1], "BONEMET_PROGRESS": "0", "SMOKE_DAG_ONLY": "1",
               "SMOKE_TARGET": "train"}  # the DAG up to train: evaluate, register, report add minutes, not checks
        proc = subprocess.run(["bash", str(REPO / "ci" / "smoke.sh"), str(work), str(extra)], capture_output=True,
                              encoding="utf-8", errors="replace", timeout=900, env=env)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return {"url": url, "urls": urls, "admin": admin, "user": user, "server_root": server_root, "work": work,
            "root": root}


def test_the_server_refuses_requests_without_valid_credentials(team):
    url, _, admin, _ = team
    assert _call(url, "experiments/search", None, max_results="10")[0] == 401
    assert _call(url, "experiments/search", (admin[0], "not-the-password"), max_results="10")[0] == 401
    assert _call(url, "experiments/search", admin, max_results="10")[0] == 200


def test_every_trial_and_run_is_there_exactly_once(team_run):
    import optuna

    url, urls, auth, work = team_run["url"], team_run["urls"], team_run["user"], team_run["work"]
    extract_log = (work / "logs" / "extract.log").read_text(encoding="utf-8")
    preprocess_log = (work / "logs" / "preprocess.log").read_text(encoding="utf-8")
    assert "Dask scheduler tcp://127.0.0.1" in extract_log and "with Dask at tcp://127.0.0.1" in preprocess_log

    experiments = {e["name"]: e for e in _api(url, "experiments/search", auth, max_results="100")["experiments"]}
    assert {"bonemet-radiomics", "bonemet-classification", "bonemet-segmentation"} <= set(experiments)

    def runs(experiment: str) -> list[dict]:
        body = {"experiment_ids": [experiments[experiment]["experiment_id"]], "max_results": 1000}
        return _api(url, "runs/search", auth, body).get("runs", [])

    # extraction: one run, one nested run per mask source
    radiomics = runs("bonemet-radiomics")
    extract = [r for r in radiomics if r["info"]["run_name"] == "extract"]
    assert len(extract) == 1 and extract[0]["info"]["status"] == "FINISHED"
    children = [r for r in radiomics if _tags(r["data"]).get("mlflow.parentRunId") == extract[0]["info"]["run_id"]]
    assert sorted(r["info"]["run_name"] for r in children) == ["extract-annotator", "extract-auto", "extract-manual"]

    # training: one train run, one nested run per model, artifacts served by the server
    classification = runs("bonemet-classification")
    train = [r for r in classification if r["info"]["run_name"] == "train"]
    assert len(train) == 1 and train[0]["info"]["status"] == "FINISHED"
    train_id = train[0]["info"]["run_id"]
    model_runs = [r for r in classification if _tags(r["data"]).get("mlflow.parentRunId") == train_id]
    assert sorted(r["info"]["run_name"] for r in model_runs) == sorted(MODELS)
    assert train[0]["info"]["artifact_uri"].startswith("mlflow-artifacts:")

    # Optuna: one study per model in PostgreSQL (the evaluate stage's repeats tune in memory), exactly
    # N_TRIALS trials each, every finished trial logged once as its model run's trial_auc
    studies = [s.study_name for s in optuna.get_all_study_summaries(urls["optuna"])]
    assert sorted(name.rsplit("-", 1)[0] for name in studies) == sorted(f"bonemet-{m}" for m in MODELS)
    for run in model_runs:
        model = run["info"]["run_name"]
        (name,) = [n for n in studies if n.startswith(f"bonemet-{model}-")]
        trials = optuna.load_study(study_name=name, storage=urls["optuna"]).trials
        assert sorted(t.number for t in trials) == list(range(N_TRIALS)), model
        assert all(t.state.is_finished() for t in trials), model
        history = _api(url, "metrics/get-history", auth, run_id=run["info"]["run_id"], metric_key="trial_auc",
                       max_results="1000")["metrics"]
        completed = {t.number: t.value for t in trials if t.value is not None}
        assert sorted(m["step"] for m in history) == sorted(completed), model  # each once, none missing
        assert {m["step"]: m["value"] for m in history} == pytest.approx(completed), model
        params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        assert params["n_trials"] == str(N_TRIALS) and params["optuna_study"] == name, model
    train_params = {p["key"]: p["value"] for p in train[0]["data"].get("params", [])}
    assert train_params["tuning_storage"] == urls["optuna"] and train_params["tuning_workers"] == "2"

    # the artifacts are in the server's store, not on the client
    stored = {p.name for p in (team_run["server_root"] / "artifacts").rglob("*") if p.is_file()}
    assert {"train.log", "extract.log", "optuna_trials.csv", "table1.json"} <= stored, sorted(stored)[:50]
    assert not (work / "mlruns").exists()


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env=env)
    assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout + proc.stderr


def test_a_fresh_clone_pulls_the_outputs_from_the_remote_without_recomputing(team_run):
    work, root = team_run["work"], team_run["root"]
    remote = root / "dvc-remote"  # a local folder standing in for s3://bucket/bonemet
    _run(["dvc", "remote", "add", "-d", "team", str(remote)], work)
    _run(["git", "add", "-A"], work)
    _run(["git", "commit", "-qm", "pipeline outputs, DVC remote"], work)
    _run(["dvc", "push"], work)
    clone = root / "clone"
    _run(["git", "clone", "-q", str(work), str(clone)], root)
    assert not (clone / "data" / "features").exists()  # only git's files so far
    _run(["dvc", "pull", "--with-deps", "train"], clone)  # the DAG ran up to train: its outputs and their inputs
    status = _run(["dvc", "status", "train"], clone)  # train and every stage it depends on
    assert "Data and pipelines are up to date" in status, status
    dry = _run(["dvc", "repro", "--dry", "train"], clone)
    assert "Running stage" not in dry, dry
    for out in ("data/features/auto.parquet", "data/preprocessed/cases.csv", "models/index.json",
                "cohorts/smoke/manifest.csv"):
        assert (clone / out).read_bytes() == (work / out).read_bytes(), out
