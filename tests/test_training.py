"""run_training end to end on a tiny feature table, with a RecordingTracker; the train stage's inputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from bonemet.modeling.persistence import load_pipeline
from bonemet.modeling.training import TrainingInputError, assemble_features, choose_best_model, run_training
from bonemet.tracking import RecordingTracker

MODELS = ["logreg", "knn", "random_forest"]



@pytest.fixture(scope="module")
def specs(params):
    """params.yaml's select/train/evaluate, cut down for 60 cases: 2 trials per model, 3 inner folds."""
    train = params.train.updated({
        "models": MODELS,
        "n_trials": {m: 2 for m in MODELS},
        "inner_folds": 3,
        "pruner_startup_trials": 1,
        "search_space": {
            "logreg": {"C": {"type": "float", "low": 0.5, "high": 10.0, "log": True}},
            "knn": {"n_neighbors": {"type": "int", "low": 3, "high": 9, "step": 2, "log": False}},
            "random_forest": {"max_depth": {"type": "int", "low": 2, "high": 4, "step": 1, "log": False}},
        },
        "fixed_params": {**params.train.fixed_params, "random_forest": {"n_estimators": 30}},
        "log_models": True,
        "log_figures": False,
        "write_figures": False,
    })
    return SimpleNamespace(
        select=params.select.updated({"lasso.max_features": 4, "lasso.cv": 3}),
        train=train,
        evaluate=params.evaluate.updated({"n_bootstrap": 50, "calibration_bins": 3}),
    )


def _tables(n: int = 60, p: int = 16, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=n)
    y = (latent + 0.6 * rng.normal(size=n) > 0).astype(int)
    X = rng.normal(size=(n, p))
    X[:, :3] += 1.5 * latent[:, None]
    noise = np.where(np.arange(p) % 2 == 0, 0.05, 3.0)
    cols = [f"original_firstorder_F{i}" for i in range(p)]
    ids = [f"case{i:03d}" for i in range(n)]

    def table(values: np.ndarray) -> pd.DataFrame:
        df = pd.DataFrame(values, columns=cols)
        df.insert(0, "label", y)
        df.insert(0, "case_id", ids)
        return df

    test = ids[::3]
    train = [i for i in ids if i not in test]
    y_of = dict(zip(ids, y, strict=True))
    fold_of: dict[str, int] = {}
    for label in (0, 1):  # stratified round-robin: 4 folds
        for k, case in enumerate(c for c in train if y_of[c] == label):
            fold_of[case] = k % 4
    splits = {"seed": 0, "test_size": len(test) / n, "n_folds": 4, "train": train, "test": test,
              "train_folds": fold_of, "all_folds": {c: i % 4 for i, c in enumerate(sorted(train + test))}}
    return table(X), table(X + rng.normal(size=(n, p)) * noise), splits


def _run(tmp_path, primary, paired, splits, specs, tracker=None, rule="knn", **train_changes):
    """run_training writing under ``tmp_path`` (models/, plots/, metrics/), ``train_changes`` applied;
    register.model ``rule``."""
    train = specs.train.updated({"out_dir": str(tmp_path / "models"), "plots_dir": str(tmp_path / "plots"),
                                 "metrics_dir": str(tmp_path / "metrics"), **train_changes})
    return run_training(
        primary, paired, splits, select=specs.select, train=train, evaluate=specs.evaluate, seed=3,
        feature_source="auto", registered_rule=rule, tracker=tracker or RecordingTracker(), bayes_auc=0.9,
    )


@pytest.mark.parametrize(("cv_aucs", "order", "best"), [
    ({"a": [0.8, 0.9], "b": [0.9, 0.95]}, ["a", "b"], "b"),                 # highest mean CV AUC
    # ties (values exact in binary, so the means are equal): the lower sd, then the order given
    ({"a": [0.625, 0.875], "b": [0.6875, 0.8125]}, ["a", "b"], "b"),
    ({"a": [0.8, 0.9], "b": [0.8, 0.9]}, ["b", "a"], "b"),
    ({"a": [0.8, 0.9], "b": [0.8, 0.9]}, ["a", "b"], "a"),
    ({"knn": [0.75], "svm": [0.5, 1.0]}, ["svm", "knn"], "knn"),            # one fold: sd 0
])
def test_choose_best_model_by_cv_auc_then_sd_then_order(cv_aucs, order, best):
    assert choose_best_model(cv_aucs, order) == best


def test_run_training_end_to_end(tmp_path, specs):
    primary, paired, splits = _tables()
    tracker = RecordingTracker()
    res = _run(tmp_path, primary, paired, splits, specs, tracker, log_figures=True, write_figures=True)

    parent = tracker.find("train")
    assert parent["parent"] is None
    children = [r for r in tracker.runs if r["parent"] == "train"]
    assert [r["name"] for r in children] == MODELS
    names = {frozenset(k for k in r["metrics"] if k != "trial_auc") for r in children}
    assert len(names) == 1  # the same metric names for every model
    for key in ("cv_auc_mean", "cv_auc_sd", "test_auc", "test_accuracy", "test_sensitivity",
                "test_specificity", "train_auc", "inner_cv_auc"):
        assert key in children[0]["metrics"]
    assert len(children[0]["metrics"]["cv_auc"]) == 4  # one per outer fold, with steps
    assert "model:model" in children[0]["artifacts"] and "optuna_trials.csv" in children[0]["artifacts"]
    assert "roc_test.png" in children[0]["artifacts"]

    cv = json.loads((tmp_path / "metrics" / "cv_auc.json").read_text())
    assert set(cv) == set(MODELS) and all(len(v["folds"]) == 4 for v in cv.values())
    table1 = json.loads((tmp_path / "metrics" / "table1.json").read_text())
    assert set(table1["models"]) == set(MODELS)
    assert set(table1["models"]["knn"]) == {"train", "test"}
    assert table1["bayes_optimal"]["auc"] == 0.9
    assert (tmp_path / "metrics" / "table1.md").is_file()
    assert (tmp_path / "plots" / "roc_test.png").is_file() and (tmp_path / "plots" / "cv_auc.csv").is_file()

    selected = json.loads((tmp_path / "models" / "selected_features.json").read_text())
    assert 1 <= selected["lasso"]["n_selected"] <= 4
    assert selected["icc"]["n_kept"] <= 16
    assert all(not s["name"].startswith("paired__") for s in selected["lasso"]["selected"])
    index = json.loads((tmp_path / "models" / "index.json").read_text())
    assert index["best_model"] == res.best_model in MODELS
    assert res.best_model == choose_best_model({m: r.cv_aucs for m, r in res.models.items()}, MODELS)
    # the registered model: the family register.model names (knn here), whatever the CV says; one story
    assert index["registered_model"] == res.registered_model == "knn" and index["registered_rule"] == "knn"
    assert table1["registered_model"] == "knn" and table1["best_model"] == res.best_model
    assert "resubstitution" in table1["train_estimate"] and selected["model"] == "knn"
    assert {k: parent["tags"][k] for k in ("registered_model", "registered_rule", "best_cv_model")} == {
        "registered_model": "knn", "registered_rule": "knn", "best_cv_model": res.best_model}
    md = (tmp_path / "metrics" / "table1.md").read_text()
    assert "| **knn** (registered) | train (resubstitution) |" in md
    assert "Registered model (bold): knn, by register.model knn" in md
    if res.best_model != "knn":
        assert f"| {res.best_model} (best CV) | test |" in md
    assert index["feature_source"] == "auto"
    assert index["feature_names"] == [c for c in primary.columns if c not in ("case_id", "label")]
    assert set(index["models"]) == set(MODELS)
    for model, entry in index["models"].items():
        r = res.models[model]
        assert entry["path"] == f"{model}.skops" and (tmp_path / "models" / entry["path"]).is_file()
        assert entry["cv_auc_mean"] == pytest.approx(r.cv_auc_mean) and entry["cv_auc_sd"] == pytest.approx(r.cv_auc_sd)
        assert entry["test_auc"] == pytest.approx(r.test_metrics["auc"])
        assert entry["params"] == r.tuning.best_params
        assert entry["threshold"] == r.threshold == r.pipeline.threshold
        assert table1["models"][model]["test"]["threshold"] == pytest.approx(r.threshold)
        assert "seconds" not in entry and "run_id" not in entry  # those are provenance
    # run ids: metrics/train_runs.json (external state, outside the cached models/), one per model run
    assert not (tmp_path / "models" / "provenance.json").exists()
    provenance = json.loads((tmp_path / "metrics" / "train_runs.json").read_text())
    assert all(set(entry) == {"run_id"} for entry in provenance["models"].values())  # times are on the runs
    run_ids = {r["name"]: f"run-{i}" for i, r in enumerate(tracker.runs, start=1)}
    assert provenance["train_run_id"] == run_ids["train"]
    for model in MODELS:
        assert provenance["models"][model]["run_id"] == res.models[model].run_id == run_ids[model]
        timed = tracker.find(model)["metrics"]
        assert timed["time_total_s"][-1][1] > 0  # the times: on the model's run

    # the saved pipeline loads with skops and serves primary-only rows like the fitted one
    loaded = load_pipeline(tmp_path / "models" / f"{res.best_model}.skops")
    rows = primary.drop(columns=["case_id", "label"]).iloc[:5]
    np.testing.assert_allclose(loaded.predict_proba(rows), res.models[res.best_model].pipeline.predict_proba(rows))


def test_test_rows_never_reach_selection_tuning_or_cv(tmp_path, specs):
    primary, paired, splits = _tables()
    first = _run(tmp_path / "a", primary, paired, splits, specs)
    feature_cols = [c for c in primary.columns if c not in ("case_id", "label")]
    is_test = primary["case_id"].isin(splits["test"])
    altered_primary, altered_paired = primary.copy(), paired.copy()
    rng = np.random.default_rng(9)
    altered_primary.loc[is_test, feature_cols] = rng.normal(size=(int(is_test.sum()), len(feature_cols))) * 50
    altered_paired.loc[is_test, feature_cols] = rng.normal(size=(int(is_test.sum()), len(feature_cols))) * 50
    second = _run(tmp_path / "b", altered_primary, altered_paired, splits, specs)

    assert first.selected_features == second.selected_features
    for model in MODELS:
        a, b = first.models[model], second.models[model]
        assert a.tuning.best_params == b.tuning.best_params
        assert a.cv_aucs == b.cv_aucs
        # calibration and the threshold are learnt from the training cases' out-of-fold scores only
        np.testing.assert_array_equal(a.scores["oof"], b.scores["oof"])
        assert a.threshold == b.threshold
        np.testing.assert_allclose(a.scores["train"], b.scores["train"])
        assert not np.allclose(a.scores["test"], b.scores["test"])  # the test rows did change


def test_same_seed_same_table1_and_model_index(tmp_path, specs):
    primary, paired, splits = _tables()
    _run(tmp_path / "a", primary, paired, splits, specs)
    _run(tmp_path / "b", primary, paired, splits, specs)
    assert (tmp_path / "a/metrics/table1.json").read_text() == (tmp_path / "b/metrics/table1.json").read_text()
    # index.json holds no timings or run ids (run ids are in metrics/train_runs.json): same data and seed, same bytes
    assert (tmp_path / "a/models/index.json").read_bytes() == (tmp_path / "b/models/index.json").read_bytes()
    # and so do the fitted pipelines (skops' object ids and zip dates are made canonical)
    for model in MODELS:
        assert (tmp_path / f"a/models/{model}.skops").read_bytes() == (tmp_path / f"b/models/{model}.skops").read_bytes()


def test_training_with_sites_and_patients(tmp_path, specs):
    """ComBat on (select.harmonize), patients in the splits: the tuning folds keep patients whole,
    the fitted pipelines need the site of each served row, index.json says so."""
    from bonemet.modeling.training import _inner_splits
    from bonemet.selection import SiteError

    primary, paired, splits = _tables()
    ids = list(primary["case_id"])
    sites = {c: ("a", "b")[i % 2] for i, c in enumerate(ids)}
    shifted = [c for c in ids if sites[c] == "b"]
    cols = [c for c in primary.columns if c not in ("case_id", "label")]
    for table in (primary, paired):
        table.loc[table["case_id"].isin(shifted), cols] += 2.0  # site b reads every feature 2 higher
    splits = {**splits, "groups": {c: f"pt{i // 2}" for i, c in enumerate(ids)}}
    for k, (fit_rows, val_rows) in enumerate(_inner_splits(np.asarray(primary["label"]), 3, 0,
                                                           [splits["groups"][c] for c in ids])):
        assert {splits["groups"][ids[i]] for i in fit_rows}.isdisjoint({splits["groups"][ids[i]] for i in val_rows}), k
    select = specs.select.updated({"harmonize.enabled": True})
    with pytest.raises(TrainingInputError, match="no site column"):
        run_training(primary, paired, splits, select=select, train=specs.train, evaluate=specs.evaluate, seed=3,
                     feature_source="auto", registered_rule="best_cv")
    train = specs.train.updated({"out_dir": str(tmp_path / "models"), "plots_dir": str(tmp_path / "plots"),
                                 "metrics_dir": str(tmp_path / "metrics")})
    res = run_training(primary, paired, splits, select=select, train=train, evaluate=specs.evaluate, seed=3,
                       feature_source="auto", registered_rule="best_cv", tracker=RecordingTracker(),
                       sites=sites)
    assert res.selected_features["harmonize"]["sites"] == ["a", "b"]
    index = json.loads((tmp_path / "models" / "index.json").read_text())
    assert index["extra_input_columns"] == ["site"]
    loaded = load_pipeline(tmp_path / "models" / f"{res.best_model}.skops")
    rows = primary.drop(columns=["case_id", "label"]).iloc[:4]
    proba = loaded.predict_proba(rows.assign(site=[sites[c] for c in ids[:4]]))
    assert proba.shape == (4, 2) and np.isfinite(proba).all()
    with pytest.raises(SiteError, match="no 'site' column"):
        loaded.predict_proba(rows)


def test_assemble_features_checks_cases_and_labels():
    primary, paired, _ = _tables(n=12, p=3)
    X, y = assemble_features(primary, paired, "paired__")
    assert list(X.columns[:3]) == [c for c in primary.columns[2:]]
    assert all(c.startswith("paired__") for c in X.columns[3:])
    with pytest.raises(TrainingInputError, match="different cases"):
        assemble_features(primary, paired.iloc[1:], "paired__")
    flipped = paired.copy()
    flipped.loc[0, "label"] = 1 - flipped.loc[0, "label"]
    with pytest.raises(TrainingInputError, match="labels differ"):
        assemble_features(primary, flipped, "paired__")


def test_stage_falls_back_to_annotator_features_when_auto_is_missing(tmp_path, caplog):
    from bonemet.modeling.training import read_feature_tables as _read_tables

    primary, paired, _ = _tables(n=10, p=2)
    primary.to_parquet(tmp_path / "annotator.parquet")
    paired.to_parquet(tmp_path / "manual.parquet")
    with caplog.at_level("WARNING"):
        p, q, p_name, q_name = _read_tables(tmp_path, "auto")
    assert (p_name, q_name) == ("annotator", "manual")
    assert "stand-in" in caplog.text
    assert _read_tables(tmp_path, "manual")[2:] == ("manual", "annotator")
    (tmp_path / "annotator.parquet").unlink()
    with pytest.raises(TrainingInputError, match=r"auto\.parquet not found \(run `bonemet extract` first\)"):
        _read_tables(tmp_path, "auto")


def test_train_stage_command_writes_its_outputs(tmp_path, monkeypatch, specs):
    import yaml

    from bonemet.cli import main
    from bonemet.config import load_params

    primary, paired, splits = _tables()
    (tmp_path / "data" / "features").mkdir(parents=True)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    primary.to_parquet(tmp_path / "data" / "features" / "auto.parquet")
    paired.to_parquet(tmp_path / "data" / "features" / "manual.parquet")
    (tmp_path / "data" / "splits.json").write_text(json.dumps(splits))
    # a synthetic cohort's cohort.json: the ceiling and each case's latent LLR (here label + noise)
    llr = {c: float(y) + float(np.random.default_rng(i).normal()) for i, (c, y) in
           enumerate(zip(primary["case_id"], primary["label"], strict=True))}
    (tmp_path / "data" / "raw" / "cohort.json").write_text(json.dumps(
        {"bayes_auc": 0.88, "cases": [{"case_id": c, "llr": v} for c, v in llr.items()]}))
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["split"]["out"] = "data/splits.json"
    params["data"]["cohort_dir"] = "data/raw"
    params["select"] = specs.select.model_dump(mode="json")
    params["train"] = specs.train.updated(
        {"models": ["logreg", "knn"], "n_trials": {"logreg": 1, "knn": 1}, "log_models": False}
    ).model_dump(mode="json")
    params["evaluate"] = specs.evaluate.model_dump(mode="json")
    params["register"]["model"] = "svm"  # not trained: refused in one line before anything runs
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-tracking"]) == 2
    params["register"]["model"] = "best_cv"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["train", "--no-tracking"]) == 0
    table1 = json.loads((tmp_path / "metrics" / "table1.json").read_text())
    assert set(table1["models"]) == {"logreg", "knn"}
    assert table1["bayes_optimal"]["auc"] == 0.88
    # the Bayes classifier scored on exactly the test cases, and the best model's paired distance to it
    from sklearn.metrics import roc_auc_score

    ref = table1["bayes_optimal"]["test_set_latent_llr"]
    y_test = primary.set_index("case_id").loc[splits["test"], "label"]
    assert ref["n"] == len(splits["test"])
    assert ref["llr_auc"] == pytest.approx(roc_auc_score(y_test, [llr[c] for c in splits["test"]]), abs=1e-6)
    index = json.loads((tmp_path / "models" / "index.json").read_text())
    best = index["registered_model"]
    assert best == index["best_model"] and index["registered_rule"] == "best_cv"
    assert ref["model_minus_llr"] == pytest.approx(table1["models"][best]["test"]["auc"] - ref["llr_auc"], abs=1e-5)
    assert ref["model_minus_llr_lo"] < ref["model_minus_llr"] < ref["model_minus_llr_hi"]
    assert "Bayes classifier itself" in (tmp_path / "metrics" / "table1.md").read_text()
    assert (tmp_path / "metrics" / "cv_auc.json").is_file()
    assert (tmp_path / "models" / "selected_features.json").is_file()
    assert (tmp_path / "models" / "logreg.skops").is_file()
    provenance = json.loads((tmp_path / "metrics" / "train_runs.json").read_text())
    assert provenance["train_run_id"] is None  # --no-tracking: no runs
    assert set(provenance["models"]) == {"logreg", "knn"}


def test_train_stage_refuses_a_misspelt_hyperparameter_before_training(tmp_path, monkeypatch, caplog, specs):
    import yaml

    from bonemet.cli import main
    from bonemet.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["train"] = specs.train.updated(
        {"fixed_params": {"knn": {"n_neighbour": 5}}}
    ).model_dump(mode="json")
    params["radiomics"]["out_dir"] = "nowhere"
    params["register"]["model"] = "knn"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        assert main(["train", "--no-tracking"]) == 1  # a user error: one line, no traceback
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert errors[0].getMessage() == ("train.fixed_params.knn.n_neighbour: knn takes no hyperparameter "
                                      "'n_neighbour'; did you mean n_neighbors?")
    assert not (tmp_path / "models").exists()  # refused before reading features or training


def test_logged_mlflow_model_loads_back_with_skops(tmp_path, monkeypatch, specs):
    import mlflow

    from bonemet.registry.store import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    primary, paired, splits = _tables()
    tracker = MlflowTracker("bonemet-classification", system_metrics=False, system_metrics_interval_s=None, tracking_uri=None, store_dir=tmp_path / "mlruns",
                            default_tags={"data_md5": "abc"})
    res = _run(tmp_path, primary, paired, splits, specs, tracker=tracker, models=["knn"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)  # MLflow's own API below reads the store from it
    runs = mlflow.search_runs(experiment_names=["bonemet-classification"])
    child = runs[runs["tags.mlflow.runName"] == "knn"].iloc[0]
    assert child["tags.data_md5"] == "abc" and child["tags.mlflow.parentRunId"]
    assert child["metrics.test_auc"] == pytest.approx(res.models["knn"].test_metrics["auc"])
    # train_runs.json names the MLflow runs (the register stage reads them from there)
    provenance = json.loads((tmp_path / "metrics" / "train_runs.json").read_text())
    assert provenance["models"]["knn"]["run_id"] == child["run_id"] == res.models["knn"].run_id
    assert provenance["train_run_id"] == child["tags.mlflow.parentRunId"]
    loaded = mlflow.sklearn.load_model(f"runs:/{child['run_id']}/model")
    rows = primary.drop(columns=["case_id", "label"]).iloc[:4]
    np.testing.assert_allclose(loaded.predict_proba(rows), res.models["knn"].pipeline.predict_proba(rows))


def test_an_xgboost_model_saves_to_the_same_bytes_and_loads_back(tmp_path):
    """skops names the booster's bytes entry by a random UUID: made canonical like the object ids."""
    from xgboost import XGBClassifier

    from bonemet.modeling.persistence import save_pipeline

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] > 0).astype(int)
    model = XGBClassifier(n_estimators=5, max_depth=2, n_jobs=1, random_state=0).fit(X, y)
    save_pipeline(model, tmp_path / "a.skops")
    save_pipeline(model, tmp_path / "b.skops")
    assert (tmp_path / "a.skops").read_bytes() == (tmp_path / "b.skops").read_bytes()
    np.testing.assert_array_equal(load_pipeline(tmp_path / "a.skops").predict_proba(X), model.predict_proba(X))
