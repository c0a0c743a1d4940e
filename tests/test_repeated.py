"""Calibration and the operating point learnt on training data, the corrected resampled t interval,
and the repeated evaluation of the whole pipeline (the evaluate stage)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from bonemet.modeling.calibration import CalibratedPipeline, ScoreCalibrator, choose_threshold
from bonemet.modeling.persistence import load_pipeline, save_pipeline
from bonemet.modeling.repeated import (
    best_by_repeats,
    committed_repeat,
    repeats_table,
    run_repeats,
    summarize_repeats,
)
from bonemet.modeling.stats import corrected_resampled_t
from bonemet.modeling.training import run_training
from bonemet.splits import make_splits, repeated_splits

MODELS = ["logreg", "knn"]


# --- the corrected resampled t interval ---------------------------------------------------------

def test_corrected_resampled_t_matches_the_formula():
    values = [0.80, 0.86, 0.83, 0.90, 0.78]
    out = corrected_resampled_t(values, n_train=124, n_test=54, alpha=0.05)
    mean, sd = np.mean(values), np.std(values, ddof=1)
    half = scipy_stats.t.ppf(0.975, df=4) * math.sqrt((1 / 5 + 54 / 124) * sd**2)
    assert out["mean"] == pytest.approx(mean) and out["sd"] == pytest.approx(sd)
    assert (out["lo"], out["hi"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    # wider than the naive interval, which ignores that the repeats share training cases
    naive = scipy_stats.t.ppf(0.975, df=4) * sd / math.sqrt(5)
    assert out["hi"] - out["lo"] > 2 * naive
    assert (out["pct_lo"], out["pct_hi"]) == tuple(pytest.approx(v) for v in np.quantile(values, [0.025, 0.975]))
    assert (out["n"], out["n_dropped"]) == (5, 0)


def test_corrected_resampled_t_is_clipped_to_the_statistics_range():
    wide = corrected_resampled_t([0.6, 0.95], n_train=20, n_test=10, alpha=0.05)  # t with 1 df: very wide
    assert wide["lo"] < 0.0 and wide["hi"] > 1.0
    clipped = corrected_resampled_t([0.6, 0.95], n_train=20, n_test=10, alpha=0.05, bounds=(0.0, 1.0))
    assert (clipped["lo"], clipped["hi"]) == (0.0, 1.0) and clipped["mean"] == wide["mean"]


def test_corrected_resampled_t_drops_undefined_values_and_needs_two():
    out = corrected_resampled_t([0.8, float("nan"), 0.9], n_train=10, n_test=5, alpha=0.1)
    assert (out["n"], out["n_dropped"]) == (2, 1) and out["mean"] == pytest.approx(0.85) and out["lo"] < 0.85
    one = corrected_resampled_t([0.8], n_train=10, n_test=5, alpha=0.05)
    assert one["mean"] == 0.8 and math.isnan(one["lo"]) and math.isnan(one["hi"])
    assert math.isnan(corrected_resampled_t([], n_train=10, n_test=5, alpha=0.05)["mean"])


# --- calibration and the threshold ---------------------------------------------------------------

def _miscalibrated(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    truth = 1 / (1 + np.exp(-(2.0 * y - 1.0 + rng.normal(size=n))))   # P(y=1 | score) rises with the score
    squashed = 0.45 + 0.1 * truth                                        # ...but every score sits near 0.5
    return squashed, y


@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
def test_calibration_brings_probabilities_to_the_observed_frequencies(method):
    scores, y = _miscalibrated()
    calibrated = ScoreCalibrator(method=method).fit(scores, y).transform(scores)
    brier_before, brier_after = np.mean((scores - y) ** 2), np.mean((calibrated - y) ** 2)
    assert brier_after < brier_before - 0.01
    assert abs(calibrated.mean() - y.mean()) < 0.02  # the prior is recovered
    order = np.argsort(scores)
    assert np.all(np.diff(calibrated[order]) >= -1e-12)  # calibration keeps the ranking (the AUC)


def test_no_calibration_is_the_identity():
    scores, y = _miscalibrated()
    np.testing.assert_array_equal(ScoreCalibrator(method="none").fit(scores, y).transform(scores), scores)


def _op(rule, target=0.8, fixed=0.5):
    return SimpleNamespace(rule=rule, target_sensitivity=target, fixed_threshold=fixed)


def test_choose_threshold_rules():
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
    y = np.array([0, 0, 1, 0, 1, 0, 1, 1])
    # Youden: J = 0.5 at 0.8 (sensitivity 2/4, specificity 4/4), 0.6 (3/4, 3/4) and 0.35 (4/4, 2/4);
    # ties go to the highest threshold
    assert choose_threshold(scores, y, _op("youden")) == 0.8
    assert choose_threshold(scores, np.array([0, 0, 0, 0, 1, 1, 1, 1]), _op("youden")) == 0.6  # J = 1
    assert choose_threshold(scores, y, _op("sensitivity", target=1.0)) == 0.35  # highest reaching 100 %
    assert choose_threshold(scores, y, _op("sensitivity", target=0.5)) == 0.8
    assert choose_threshold(scores, y, _op("fixed", fixed=0.42)) == 0.42


def test_a_calibrated_pipeline_predicts_at_its_threshold_and_round_trips_with_skops(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    X = pd.DataFrame(rng.normal(size=(80, 3)), columns=["a", "b", "c"])
    y = (X["a"] + 0.5 * rng.normal(size=80) > 0).astype(int)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    cal = ScoreCalibrator(method="sigmoid").fit(pipe.predict_proba(X)[:, 1], y)
    model = CalibratedPipeline(pipeline=pipe, calibrator=cal, threshold=0.3)
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(model.predict(X), (proba[:, 1] >= 0.3).astype(int))
    save_pipeline(model, tmp_path / "m.skops")
    back = load_pipeline(tmp_path / "m.skops")
    np.testing.assert_array_equal(back.predict_proba(X), proba)
    assert back.threshold == 0.3


# --- the repeated evaluation -----------------------------------------------------------------------

def _cohort(n=72, p=10, seed=0):
    """Two feature tables (primary, paired), the committed split, and each case's 'latent' LLR."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=n)
    y = (latent + 0.5 * rng.normal(size=n) > 0).astype(int)
    X = rng.normal(size=(n, p))
    X[:, :3] += 1.2 * latent[:, None]
    cols = [f"original_firstorder_F{i}" for i in range(p)]
    ids = [f"case{i:03d}" for i in range(n)]

    def table(values):
        df = pd.DataFrame(values, columns=cols)
        df.insert(0, "label", y)
        df.insert(0, "case_id", ids)
        return df

    splits = make_splits(ids, y.tolist(), test_size=0.3, n_folds=3, seed=7)
    llr = dict(zip(ids, (2.0 * latent).tolist(), strict=True))
    return table(X), table(X + 0.05 * rng.normal(size=(n, p))), splits, llr


@pytest.fixture(scope="module")
def specs(params):
    train = params.train.updated({
        "models": MODELS, "n_trials": {m: 2 for m in MODELS}, "inner_folds": 3, "pruner_startup_trials": 1,
        "search_space": {"logreg": {"C": {"type": "float", "low": 0.5, "high": 5.0, "log": True}},
                         "knn": {"n_neighbors": {"type": "int", "low": 3, "high": 7, "step": 2, "log": False}}},
        "log_models": False, "log_figures": False, "write_figures": False,
    })
    return SimpleNamespace(select=params.select.updated({"lasso.max_features": 4, "lasso.cv": 3}), train=train,
                           evaluate=params.evaluate.updated({"n_bootstrap": 20, "repeats": 3}))


def test_repeat_splits_use_seed_plus_r_and_are_stratified():
    ids = [f"c{i}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    splits = repeated_splits(ids, labels, n_repeats=3, test_size=0.3, n_folds=3, seed=5)
    assert len(splits) == 2
    for r, split in enumerate(splits, start=1):
        assert split == make_splits(ids, labels, test_size=0.3, n_folds=3, seed=5 + r)
        assert not set(split["train"]) & set(split["test"])
    assert splits[0]["test"] != splits[1]["test"]


def test_repeats_refit_everything_on_their_own_training_cases(specs):
    primary, paired, committed, llr = _cohort()
    splits = repeated_splits(list(primary["case_id"]), list(primary["label"]), n_repeats=3, test_size=0.3,
                             n_folds=3, seed=11)
    records = run_repeats(primary, paired, splits, first_repeat=1, select=specs.select, train=specs.train,
                          evaluate=specs.evaluate, seed=11, case_llr=llr, n_jobs=2, show_progress=False,
                          registered_rule="best_cv")
    assert [r["repeat"] for r in records] == [1, 2] and [r["seed"] for r in records] == [12, 13]
    for record, split in zip(records, splits, strict=True):
        assert record["n_test"] == len(split["test"]) and record["chosen"] in MODELS
        # best_cv: the repeat's own training set chooses, by CV AUC (never its test AUC)
        assert record["chosen"] == record["best_cv"] == max(
            MODELS, key=lambda m: (record["models"][m]["cv_auc_mean"], -MODELS.index(m)))
        assert set(record["models"]) == set(MODELS)
        assert 0.0 <= record["models"]["logreg"]["auc"] <= 1.0 and 0.0 <= record["llr_auc"] <= 1.0
        assert record["chosen_minus_llr"] == pytest.approx(record["models"][record["chosen"]]["auc"]
                                                           - record["llr_auc"])
        # the plain baseline on the same split, paired with the chosen model
        assert 0.5 < record["baseline_auc"] <= 1.0  # the signal is in a few columns: L1 finds it
        assert record["chosen_minus_baseline"] == pytest.approx(record["models"][record["chosen"]]["auc"]
                                                                - record["baseline_auc"])
    # a repeat's test cases change its scores only: altering them leaves what its training set chose
    is_test = primary["case_id"].isin(splits[0]["test"])
    cols = [c for c in primary.columns if c not in ("case_id", "label")]
    altered_p, altered_q = primary.copy(), paired.copy()
    noise = np.random.default_rng(3).normal(size=(int(is_test.sum()), len(cols))) * 40
    altered_p.loc[is_test, cols] = noise
    altered_q.loc[is_test, cols] = noise
    again = run_repeats(altered_p, altered_q, splits[:1], first_repeat=1, select=specs.select, train=specs.train,
                        evaluate=specs.evaluate, seed=11, case_llr=llr, n_jobs=1, show_progress=False,
                        registered_rule="best_cv")[0]
    assert again["chosen"] == records[0]["chosen"]
    for model in MODELS:
        assert again["models"][model]["cv_auc_mean"] == records[0]["models"][model]["cv_auc_mean"]
        assert again["models"][model]["threshold"] == records[0]["models"][model]["threshold"]
    # the same seed gives the same records, bit for bit, in parallel or not
    serial = run_repeats(primary, paired, splits, first_repeat=1, select=specs.select, train=specs.train,
                         evaluate=specs.evaluate, seed=11, case_llr=llr, n_jobs=1, show_progress=False,
                         registered_rule="best_cv")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in serial] == strip


def test_repeats_keep_patients_whole_and_harmonise_with_the_sites(specs):
    from bonemet.modeling.training import TrainingInputError
    from bonemet.splits import patients_on_both_sides

    primary, paired, _, llr = _cohort()
    ids, labels = list(primary["case_id"]), list(primary["label"])
    patients = [f"pt{i // 2:02d}" for i in range(len(ids))]
    splits = repeated_splits(ids, labels, n_repeats=3, test_size=0.3, n_folds=3, seed=11, groups=patients)
    assert all(split["groups"] == dict(zip(ids, patients, strict=True)) for split in splits)
    assert all(patients_on_both_sides(split) == [] for split in splits)
    select = specs.select.updated({"harmonize.enabled": True})
    with pytest.raises(TrainingInputError, match="no site column"):
        run_repeats(primary, paired, splits[:1], first_repeat=1, select=select, train=specs.train,
                    evaluate=specs.evaluate, seed=11, case_llr=llr, n_jobs=1, show_progress=False,
                    registered_rule="knn")
    sites = {c: ("a", "b")[i % 2] for i, c in enumerate(ids)}
    (record,) = run_repeats(primary, paired, splits[:1], first_repeat=1, select=select, train=specs.train,
                            evaluate=specs.evaluate, seed=11, case_llr=llr, n_jobs=1, show_progress=False,
                            sites=sites, registered_rule="knn")
    # a family named: chosen in every repeat, whatever the CV says (recorded beside it)
    assert record["chosen"] == "knn" and record["best_cv"] in MODELS
    assert 0.0 <= record["models"]["logreg"]["auc"] <= 1.0


def test_repeat_zero_is_table_1_and_the_summary(tmp_path, specs):
    primary, paired, committed, llr = _cohort()
    train = specs.train.updated({"out_dir": str(tmp_path / "models"), "metrics_dir": str(tmp_path / "metrics"),
                                 "plots_dir": str(tmp_path / "plots")})
    res = run_training(primary, paired, committed, select=specs.select, train=train, evaluate=specs.evaluate,
                       seed=7, feature_source="auto", registered_rule="logreg", bayes_auc=0.9, case_llr=llr)
    table1 = json.loads((tmp_path / "metrics" / "table1.json").read_text())
    index = json.loads((tmp_path / "models" / "index.json").read_text())
    zero = committed_repeat(table1, index, committed, 7, baseline_auc=0.8)
    assert zero["chosen"] == "logreg" == res.registered_model and zero["n_test"] == len(committed["test"])
    assert zero["best_cv"] == res.best_model
    assert zero["chosen_minus_baseline"] == pytest.approx(zero["models"]["logreg"]["auc"] - 0.8)
    for model in MODELS:
        assert zero["models"][model]["auc"] == pytest.approx(res.models[model].test_metrics["auc"], abs=1e-6)
        assert zero["models"][model]["threshold"] == pytest.approx(res.models[model].threshold, abs=1e-6)
    reference = table1["bayes_optimal"]["test_set_latent_llr"]
    assert zero["llr_auc"] == reference["llr_auc"]
    assert zero["chosen_minus_llr"] == pytest.approx(reference["model_minus_llr"], abs=1e-6)

    records = [zero, {**zero, "repeat": 1, "chosen": "knn",
                      "models": {m: {**v, "auc": v["auc"] - 0.05} for m, v in zero["models"].items()},
                      "llr_auc": zero["llr_auc"], "chosen_minus_llr": zero["models"]["knn"]["auc"] - 0.05
                      - zero["llr_auc"]}]
    summary = summarize_repeats(records, MODELS, alpha=0.05)
    assert summary["n_repeats"] == 2 and sum(summary["models"][m]["times_chosen"] for m in MODELS) == 2
    assert summary["models"]["logreg"]["auc"]["mean"] == pytest.approx(zero["models"]["logreg"]["auc"] - 0.025)
    assert summary["chosen"]["auc"]["n"] == 2 and "llr" in summary
    assert summary["llr"]["chosen_minus_llr"]["mean"] == pytest.approx(
        np.mean([r["chosen_minus_llr"] for r in records]))
    assert best_by_repeats(summary, MODELS) in MODELS
    table = repeats_table(records)
    assert len(table) == 4 and table["chosen"].sum() == 2 and set(table["model"]) == set(MODELS)


def test_evaluate_stage_writes_the_repeated_estimate_and_the_headline(tmp_path, monkeypatch, specs, params_file):
    from bonemet.cli import main

    primary, paired, committed, llr = _cohort()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "features").mkdir()
    primary.to_parquet(tmp_path / "features" / "auto.parquet")
    paired.to_parquet(tmp_path / "features" / "manual.parquet")
    (tmp_path / "splits.json").write_text(json.dumps(committed))
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "cohort.json").write_text(json.dumps({"bayes_auc": 0.9, "cases": [{"case_id": k, "llr": v}
                                                                               for k, v in llr.items()]}))
    train = specs.train.model_dump(mode="json") | {"out_dir": "models",
                                                   "metrics_dir": "metrics", "plots_dir": "plots"}
    path = params_file({"data": {"cohort_dir": "cohort"}, "split": {"out": "splits.json", "n_folds": 3},
                        "select": specs.select.model_dump(mode="json"), "train": train,
                        "radiomics": {"out_dir": "features"},
                        "evaluate": {"repeats": 3, "n_bootstrap": 20, "n_jobs": 2, "out_dir": "metrics"},
                        "register": {"model": "knn"},
                        "tracking": {"store_dir": "mlruns"}})
    assert main(["train", "--params", str(path), "--no-tracking"]) == 0
    assert main(["evaluate", "--params", str(path), "--no-tracking", "--no-progress"]) == 0
    repeated = json.loads(Path("metrics/repeated.json").read_text())
    assert repeated["n_repeats"] == 3 and [r["repeat"] for r in repeated["repeats"]] == [0, 1, 2]
    assert repeated["registered_model"] == "knn" == repeated["registered_rule"] and "llr" in repeated
    # the interval is about what is registered: knn in every repeat
    assert [r["chosen"] for r in repeated["repeats"]] == ["knn"] * 3
    assert repeated["chosen"]["auc"] == repeated["models"]["knn"]["auc"]
    assert repeated["best_repeated_model"] in MODELS
    summary = json.loads(Path("metrics/summary.json").read_text())
    assert summary["n_repeats"] == 3 and summary["registered_model"] == "knn" and summary["registered_rule"] == "knn"
    assert summary["registered_repeated_auc"] == repeated["models"]["knn"]["auc"]["mean"]
    assert summary["best_repeated_model"] == repeated["best_repeated_model"]
    assert summary["gap_to_llr"] == pytest.approx(repeated["llr"]["chosen_minus_llr"]["mean"], abs=1e-6)
    # the registered pipeline against the plain baseline, paired repeat by repeat, with the corrected interval
    diffs = [r["chosen_minus_baseline"] for r in repeated["repeats"]]
    assert repeated["baseline"]["chosen_minus_baseline"]["mean"] == pytest.approx(np.mean(diffs), abs=1e-6)
    assert summary["registered_minus_baseline"] == pytest.approx(np.mean(diffs), abs=1e-6)
    assert summary["registered_minus_baseline_lo"] < summary["registered_minus_baseline"] \
        < summary["registered_minus_baseline_hi"]
    assert len(summary) <= 20  # a screenful of headline numbers for `dvc exp show`
    assert len(pd.read_csv("metrics/repeated.csv")) == 3 * len(MODELS)
    first = {name: Path(f"metrics/{name}").read_bytes() for name in ("repeated.json", "repeated.csv", "summary.json")}
    assert all("seconds" not in r for r in repeated["repeats"])  # times go to MLflow, not the outputs
    assert main(["evaluate", "--params", str(path), "--no-tracking", "--no-progress"]) == 0
    for name, content in first.items():  # same seed, same repeats: the same bytes
        assert Path(f"metrics/{name}").read_bytes() == content, name
