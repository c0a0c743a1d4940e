"""The whole DVC pipeline on a tiny synthetic cohort (ci/smoke.sh), then `dvc repro` again is a no-op.

The smoke cohort is a user's cohort as the README describes it: outside data/raw (cohorts/smoke,
versioned by its own .dvc file) and with lesion label 2 (ci/smoke_params.yaml), so the run checks
that every stage follows data.cohort_dir and data.mask_label.

It runs against an MLflow tracking server started on loopback (``MLFLOW_TRACKING_URI``, as a team
would), and then finds, through the server's REST API as any client would: the stages' parent runs
with their nested fold, model and repeat runs, the datasets each run saw, system metrics, the
stage logs, and the registered models with their aliases. The report is opened in headless
Chromium, and so is the MLflow UI's comparison of the classifiers (the README's screenshot).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mlflow_server import mlflow_server as start_mlflow_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 (SQLite backend, served artifacts); yields its URL."""
    root = tmp_path / "server"
    root.mkdir()
    with start_mlflow_server(root, ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                    "--artifacts-destination", str(root / "artifacts")], timeout_s=120) as url:
        yield url


def _api(url: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """One MLflow REST call (POST with a JSON body, else GET with ``query``)."""
    target = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(target, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


@pytest.mark.slow
def test_dvc_pipeline_smoke_run(tmp_path, mlflow_server):
    work = tmp_path / "smoke"
    proc = subprocess.run(
        ["bash", str(REPO / "ci" / "smoke.sh"), str(work)], capture_output=True, encoding="utf-8", errors="replace",
        timeout=1500, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "BONEMET_PROGRESS": "0"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "second repro must do nothing" in proc.stdout and "smoke run passed" in proc.stdout
    assert "misspelt keys refused" in proc.stdout
    _check_dvc_contract(work)
    for out in ["data/validation/report.json", "data/splits.json", "metrics/table1.json", "metrics/summary.json",
                "metrics/repeated.json", "reports/index.html"]:
        assert (work / out).exists(), out

    # the cohort lives outside data/raw, is versioned by DVC, and is a dependency of the stages
    params = yaml.safe_load((work / "params.yaml").read_text())
    cohort = work / params["data"]["cohort_dir"]
    assert params["data"]["cohort_dir"] == "cohorts/smoke" and params["data"]["mask_label"] == 2
    assert not (work / "data" / "raw").exists()
    dvc_file = yaml.safe_load((work / "cohorts" / "smoke.dvc").read_text())
    assert dvc_file["outs"][0]["path"] == "smoke" and dvc_file["outs"][0]["md5"].endswith(".dir")
    first = work / "first_repro"  # the outputs of the first `dvc repro`, before the experiments
    lock = yaml.safe_load((first / "dvc.lock").read_text())
    for stage in ("validate", "plan", "preprocess", "segment", "extract", "train"):
        assert "cohorts/smoke" in [d["path"] for d in lock["stages"][stage]["deps"]], stage
    # the plan stage planned every `auto` setting; preprocess and segment read it
    plan = json.loads((first / "plan.json").read_text())
    assert {v["source"] for v in plan["values"].values()} == {"plan"} and plan["fingerprint"]["n_cases"] == 24
    for stage in ("preprocess", "segment", "report"):
        assert "data/plan.json" in [d["path"] for d in lock["stages"][stage]["deps"]], stage
    geometry = json.loads(next((first / "geometry").glob("*_geometry.json")).read_text())
    assert geometry["resampled_spacing_mm"] == pytest.approx(plan["values"]["preprocess.target_spacing_mm"]["value"])
    # label 2 everywhere: validation, the automatic masks, Dice, every case's features
    report = json.loads((work / "data/validation/report.json").read_text())
    assert report["passed"] and report["params"]["mask_label"] == 2
    cases = pd.read_csv(cohort / "manifest.csv")["case_id"].tolist()
    import SimpleITK as sitk

    values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "masks" / f"{cases[0]}.nii.gz"))))
    assert set(values.tolist()) == {0, 2}
    auto = sorted((first / "auto_masks").glob("*.nii.gz"))
    assert len(auto) == len(cases)
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(auto[0])))).tolist()) <= {0, 2}
    seg = json.loads((first / "metrics/segmentation.json").read_text())
    assert seg["n_cases"] == len(cases) and math.isfinite(seg["dice_mean"]) and seg["dice_mean"] > 0
    assert seg["gate"]["promote"] and seg["gate"]["registered"] and seg["gate"]["min_dice"] == 0.0
    # each fold's stop reason: the planned step budget (ci/smoke_params.yaml: 60 epochs of 7 steps)
    assert plan["values"]["segment.train.max_steps"] == {"value": 420, "source": "plan", "planned": 420}
    assert [(f["stop_reason"], f["steps"]) for f in seg["folds"]] == [("budget", 420)] * 3
    assert seg["stop_reasons"] == {"budget": 3} and seg["max_steps"] == 420
    assert not {"wall_seconds", "train_seconds_total", "infer_seconds_per_case"} & set(seg)  # MLflow's, not DVC's
    # the registered classifier's training domain, fitted by the train stage
    registry = json.loads((first / "metrics/registry.json").read_text())
    domain = json.loads((work / "models/domain.json").read_text())
    assert domain[registry["classifier"]]["oof_flag_rate"] <= params["train"]["domain"]["max_flag_rate"]
    assert (work / "models" / f"{registry['classifier']}.domain.skops").is_file()
    for source in ("manual", "auto", "annotator"):
        table = pd.read_parquet(work / "data/features" / f"{source}.parquet")
        assert sorted(table["case_id"]) == sorted(cases), source
        assert table["original_shape_VoxelVolume"].gt(0).all(), source

    _check_tracking_server(mlflow_server, work, cohort_md5=dvc_file["outs"][0]["md5"], n_cases=len(cases),
                           shots=tmp_path / "screenshots")
    # the stages' logs: every warning in full, and one summary line per kind on screen
    train_log = (first / "logs" / "train.log").read_text(encoding="utf-8")
    assert "training on auto features" in train_log
    summary = [line for line in (proc.stdout + proc.stderr).splitlines() if "bonemet: train: " in line and " x " in line]
    assert summary and all("(full text: logs/train.log)" in line for line in summary), summary
    # no warning printed in full (Python's own format "file:line: Category: message")
    assert "Warning: " not in proc.stdout + proc.stderr, [line for line in (proc.stdout + proc.stderr).splitlines()
                                                          if "Warning: " in line][:5]
    # the parallel MISSU folds (segment.parallel_folds 2): every line of a fold worker names its fold
    segment = (first / "logs" / "segment.log").read_text(encoding="utf-8")
    epoch_lines = [line for line in segment.splitlines() if "bonemet.segmentation.training: " in line]
    assert epoch_lines and all("[fold " in line for line in epoch_lines), epoch_lines[:3]
    # the report: every section with its data, opened in Chromium at 1400 px
    from browser import check_report_in_browser

    page = (work / "reports" / "index.html").read_text(encoding="utf-8")
    for text in ("Table 1", "Per fold", "LASSO", "Replication", "bonemet-classifier", "DeLong", "Repeated splits"):
        assert text in page, text
    check_report_in_browser(work / "reports" / "index.html", tmp_path / "screenshots")


#: The outputs that record external state (MLflow run ids, registry versions, the registry as the
#: report shows it): the only ones whose bytes may differ between two runs of the same code, data
#: and params.
EXTERNAL_STATE = {"metrics/train_runs.json", "metrics/registry.json", "reports/index.html"}


def _outs(lock: dict) -> dict[str, str]:
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def _check_dvc_contract(work: Path) -> None:
    """Issue 21's contract, from what ci/smoke.sh left: a forced rerun under load writes the same
    bytes; queued experiments rerun only what changed and track to the project's one store; a
    killed experiment leaves no process behind. (The fresh clone's check is in smoke.sh itself.)"""
    first = yaml.safe_load((work / "first_repro" / "dvc.lock").read_text())
    forced = yaml.safe_load((work / "forced.lock").read_text())
    assert _outs(first).keys() == _outs(forced).keys()
    differ = sorted(p for p in _outs(first) if _outs(first)[p] != _outs(forced)[p])
    assert set(differ) <= EXTERNAL_STATE, differ
    def deps(lock: dict) -> dict:  # what each stage read (external state aside: the register stage reads run ids)
        return {s: [d for d in v["deps"] if d["path"] not in EXTERNAL_STATE] for s, v in lock["stages"].items()}

    assert deps(first) == deps(forced)
    checkpoints = sorted(p.name for p in (work / "first_repro" / "checkpoints").glob("fold-*.pt"))
    assert checkpoints == ["fold-0.pt", "fold-1.pt", "fold-2.pt"]
    for name in checkpoints:  # the weights too, trained beside a CPU-burning process
        assert (work / "first_repro" / "checkpoints" / name).read_bytes() == \
            (work / "forced" / "checkpoints" / name).read_bytes(), name

    # two queued experiments changing a register param: each reran register and report only
    for name in ("exp-a", "exp-b"):
        ran = re.findall(r"Running stage '(\w+)'", (work / f"queue_{name}.log").read_text(encoding="utf-8"))
        assert sorted(ran) == ["register", "report"], (name, ran)
    shown = (work / "queued_show.csv").read_text(encoding="utf-8")
    assert "exp-a" in shown and "exp-b" in shown
    # ... and landed in the project's one store (at the repository root), tagged with their names
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bonemet-classification")
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'register'")
    assert sorted(r.data.tags.get("dvc_exp", "") for r in runs) == ["exp-a", "exp-b"]
    assert all(r.info.status == "FINISHED" for r in runs)
    versions = client.search_model_versions("name = 'bonemet-classifier'")
    assert sorted(v.tags.get("dvc_exp", "") for v in versions) == ["exp-a", "exp-b"]
    assert not list((work / ".dvc" / "tmp").rglob("mlflow.db"))  # no store in a temporary workspace

    # dvc queue kill: the stage and its fold workers are gone
    assert (work / "kill_before.txt").read_text().strip(), "the queued segment stage never started"
    assert not (work / "kill_after.txt").read_text().strip(), (work / "kill_after.txt").read_text()


def _check_tracking_server(url: str, work: Path, *, cohort_md5: str, n_cases: int, shots: Path) -> None:
    """What a user finds on the team server after the pipeline: runs, nested runs, datasets, models."""
    experiments = {e["name"]: e for e in _api(url, "experiments/search", {"max_results": 100})["experiments"]}
    for name in ("bonemet-segmentation", "bonemet-radiomics", "bonemet-classification"):
        assert _tags(experiments[name])["mlflow.experimentKind"] == "custom_model_development", name

    def runs_of(experiment: str) -> list[dict]:
        found = _api(url, "runs/search", {"experiment_ids": [experiments[experiment]["experiment_id"]],
                                          "max_results": 1000})
        return found.get("runs", [])

    def children(runs: list[dict], parent: dict) -> list[dict]:
        return [r for r in runs if _tags(r["data"]).get("mlflow.parentRunId") == parent["info"]["run_id"]]

    def datasets(run: dict) -> dict[str, dict]:
        return {d["dataset"]["name"]: {**d["dataset"], "tags": _tags(d)}
                for d in run.get("inputs", {}).get("dataset_inputs", [])}

    seg_runs = runs_of("bonemet-segmentation")
    parent = next(r for r in seg_runs if r["info"]["run_name"] == "segment" and children(seg_runs, r))
    folds = sorted(r["info"]["run_name"] for r in children(seg_runs, parent))
    assert folds == ["fold-0", "fold-1", "fold-2"]
    cohort = datasets(parent)["cohort"]
    assert cohort["digest"] == cohort_md5[:36] and cohort["tags"]["n_cases"] == str(n_cases)
    assert all("cohort" in datasets(r) for r in children(seg_runs, parent)), "every fold run names its data"
    metrics = {m["key"] for m in parent["data"].get("metrics", [])}
    assert any(k.startswith("system/") for k in metrics), f"no system metrics on the segment run: {sorted(metrics)}"

    cls_runs = runs_of("bonemet-classification")
    train = next(r for r in cls_runs if r["info"]["run_name"] == "train")
    models = children(cls_runs, train)
    assert sorted(r["info"]["run_name"] for r in models) == sorted(
        ["svm", "logreg", "knn", "random_forest", "extra_trees", "xgboost", "lightgbm", "mlp"])
    for run in models:
        assert {"cohort", "features-auto", "features-manual"} <= set(datasets(run)), run["info"]["run_name"]
    assert datasets(train)["features-auto"]["tags"]["n_cases"] == str(n_cases)
    evaluate = next(r for r in cls_runs if r["info"]["run_name"] == "evaluate")
    assert sorted(r["info"]["run_name"] for r in children(cls_runs, evaluate)) == ["repeat-0", "repeat-1"]
    logs = _api(url, "artifacts/list", run_id=train["info"]["run_id"], path="logs").get("files", [])
    assert [f["path"] for f in logs] == ["logs/train.log"]

    registered = {m["name"]: m for m in _api(url, "registered-models/search", max_results="100")["registered_models"]}
    for name in ("bonemet-classifier", "bonemet-segmenter"):
        assert "staging" in {a["alias"] for a in registered[name].get("aliases", [])}, registered.get(name)

    # the README's screenshot: the MLflow UI comparing the eight classifiers' runs
    from browser import screenshot

    ids = json.dumps([r["info"]["run_id"] for r in models])
    exp_id = json.dumps([experiments["bonemet-classification"]["experiment_id"]])
    compare = (f"{url}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(exp_id)}"
               "&workflowType=machine_learning")
    shot = screenshot(compare, shots / "mlflow-compare-classifiers.png", width=1600, height=1000, wait_ms=20000)
    print(f"MLflow UI screenshot: {shot}")
