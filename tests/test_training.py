"""run_training end to end on a tiny feature table, with a RecordingTracker; the train stage's inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonemet.modeling.training import TrainingInputError, assemble_features, load_pipeline, run_training
from bonemet.tracking import RecordingTracker

MODELS = ["logreg", "knn", "random_forest"]
TRAIN = {
    "models": MODELS,
    "n_trials": {"default": 2},
    "inner_folds": 3,
    "pruner_startup_trials": 1,
    "search_space": {
        "logreg": {"C": {"type": "float", "low": 0.5, "high": 10.0, "log": True}},
        "knn": {"n_neighbors": {"type": "int", "low": 3, "high": 9, "step": 2}},
        "random_forest": {"max_depth": {"type": "int", "low": 2, "high": 4}},
    },
    "fixed_params": {"random_forest": {"n_estimators": 30}},
    "log_models": True,
    "log_figures": False,
    "write_figures": False,
}
SELECT = {"icc": {"threshold": 0.9}, "lasso": {"max_features": 4, "cv": 3}}
EVALUATE = {"n_bootstrap": 50, "calibration_bins": 3}


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
    splits = {"seed": 0, "train": train, "test": test, "train_folds": fold_of}
    return table(X), table(X + rng.normal(size=(n, p)) * noise), splits


def _run(tmp_path, primary, paired, splits, tracker=None, evaluate=EVALUATE, train=TRAIN):
    return run_training(
        primary, paired, splits, select_params=SELECT, train_params=train, evaluate_params=evaluate, seed=3,
        tracker=tracker or RecordingTracker(), out_dir=tmp_path / "models", plots_dir=tmp_path / "plots",
        metrics_dir=tmp_path / "metrics", bayes_auc=0.9,
    )


def test_run_training_end_to_end(tmp_path):
    primary, paired, splits = _tables()
    tracker = RecordingTracker()
    res = _run(tmp_path, primary, paired, splits, tracker, train={**TRAIN, "log_figures": True, "write_figures": True})

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

    # the saved pipeline loads with skops and serves primary-only rows like the fitted one
    loaded = load_pipeline(tmp_path / "models" / f"{res.best_model}.skops")
    rows = primary.drop(columns=["case_id", "label"]).iloc[:5]
    np.testing.assert_allclose(loaded.predict_proba(rows), res.models[res.best_model].pipeline.predict_proba(rows))


def test_test_rows_never_reach_selection_tuning_or_cv(tmp_path):
    primary, paired, splits = _tables()
    first = _run(tmp_path / "a", primary, paired, splits)
    feature_cols = [c for c in primary.columns if c not in ("case_id", "label")]
    is_test = primary["case_id"].isin(splits["test"])
    altered_primary, altered_paired = primary.copy(), paired.copy()
    rng = np.random.default_rng(9)
    altered_primary.loc[is_test, feature_cols] = rng.normal(size=(int(is_test.sum()), len(feature_cols))) * 50
    altered_paired.loc[is_test, feature_cols] = rng.normal(size=(int(is_test.sum()), len(feature_cols))) * 50
    second = _run(tmp_path / "b", altered_primary, altered_paired, splits)

    assert first.selected_features == second.selected_features
    for model in MODELS:
        a, b = first.models[model], second.models[model]
        assert a.tuning.best_params == b.tuning.best_params
        assert a.cv_aucs == b.cv_aucs
        np.testing.assert_allclose(a.scores["train"], b.scores["train"])
        assert not np.allclose(a.scores["test"], b.scores["test"])  # the test rows did change


def test_same_seed_same_table1(tmp_path):
    primary, paired, splits = _tables()
    _run(tmp_path / "a", primary, paired, splits)
    _run(tmp_path / "b", primary, paired, splits)
    assert (tmp_path / "a/metrics/table1.json").read_text() == (tmp_path / "b/metrics/table1.json").read_text()


def test_assemble_features_checks_cases_and_labels():
    primary, paired, _ = _tables(n=12, p=3)
    X, y = assemble_features(primary, paired)
    assert list(X.columns[:3]) == [c for c in primary.columns[2:]]
    assert all(c.startswith("paired__") for c in X.columns[3:])
    with pytest.raises(TrainingInputError, match="different cases"):
        assemble_features(primary, paired.iloc[1:])
    flipped = paired.copy()
    flipped.loc[0, "label"] = 1 - flipped.loc[0, "label"]
    with pytest.raises(TrainingInputError, match="labels differ"):
        assemble_features(primary, flipped)


def test_stage_falls_back_to_annotator_features_when_auto_is_missing(tmp_path, caplog):
    from bonemet.stages.train import _read_tables

    primary, paired, _ = _tables(n=10, p=2)
    primary.to_parquet(tmp_path / "annotator.parquet")
    paired.to_parquet(tmp_path / "manual.parquet")
    with caplog.at_level("WARNING"):
        p, q, p_name, q_name = _read_tables(tmp_path, "auto")
    assert (p_name, q_name) == ("annotator", "manual")
    assert "stand-in" in caplog.text
    assert _read_tables(tmp_path, "manual")[2:] == ("manual", "annotator")
    (tmp_path / "annotator.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="auto.parquet"):
        _read_tables(tmp_path, "auto")


def test_train_stage_command_writes_its_outputs(tmp_path, monkeypatch):
    import yaml

    from bonemet.cli import main
    from bonemet.config import deep_merge, load_params

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
    params = deep_merge(load_params(Path(__file__).resolve().parents[1] / "params.yaml"), {
        "split": {"out": "data/splits.json"},
        "data": {"cohort_dir": "data/raw"},
        "select": SELECT,
        "train": {**TRAIN, "models": ["logreg", "knn"], "n_trials": 1, "log_models": False},
        "evaluate": EVALUATE,
    })
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-mlflow"]) == 0
    table1 = json.loads((tmp_path / "metrics" / "table1.json").read_text())
    assert set(table1["models"]) == {"logreg", "knn"}
    assert table1["bayes_optimal"]["auc"] == 0.88
    # the Bayes classifier scored on exactly the test cases, and the best model's paired distance to it
    from sklearn.metrics import roc_auc_score

    ref = table1["bayes_optimal"]["test_set_latent_llr"]
    y_test = primary.set_index("case_id").loc[splits["test"], "label"]
    assert ref["n"] == len(splits["test"])
    assert ref["llr_auc"] == pytest.approx(roc_auc_score(y_test, [llr[c] for c in splits["test"]]), abs=1e-6)
    best = json.loads((tmp_path / "models" / "index.json").read_text())["best_model"]
    assert ref["model_minus_llr"] == pytest.approx(table1["models"][best]["test"]["auc"] - ref["llr_auc"], abs=1e-5)
    assert ref["model_minus_llr_lo"] < ref["model_minus_llr"] < ref["model_minus_llr_hi"]
    assert "Bayes classifier itself" in (tmp_path / "metrics" / "table1.md").read_text()
    assert (tmp_path / "metrics" / "cv_auc.json").is_file()
    assert (tmp_path / "models" / "selected_features.json").is_file()
    assert (tmp_path / "models" / "logreg.skops").is_file()


def test_logged_mlflow_model_loads_back_with_skops(tmp_path):
    import mlflow

    from bonemet.tracking.mlflow_backend import MlflowTracker

    primary, paired, splits = _tables()
    tracker = MlflowTracker("bonemet-classification", store_dir=tmp_path / "mlruns", default_tags={"data_md5": "abc"})
    res = _run(tmp_path, primary, paired, splits, tracker=tracker, train={**TRAIN, "models": ["knn"]})
    runs = mlflow.search_runs(experiment_names=["bonemet-classification"])
    child = runs[runs["tags.mlflow.runName"] == "knn"].iloc[0]
    assert child["tags.data_md5"] == "abc" and child["tags.mlflow.parentRunId"]
    assert child["metrics.test_auc"] == pytest.approx(res.models["knn"].test_metrics["auc"])
    loaded = mlflow.sklearn.load_model(f"runs:/{child['run_id']}/model")
    rows = primary.drop(columns=["case_id", "label"]).iloc[:4]
    np.testing.assert_allclose(loaded.predict_proba(rows), res.models["knn"].pipeline.predict_proba(rows))
