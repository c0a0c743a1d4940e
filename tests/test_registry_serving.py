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

from bonemet.modeling import TRAIN_RUNS_FILE
from bonemet.modeling.domain import domain_file
from bonemet.modeling.persistence import load_pipeline, save_pipeline
from bonemet.modeling.repeated import best_by_repeats
from bonemet.modeling.training import choose_best_model, choose_registered_model, registered_rule_text
from bonemet.registry.gate import Estimate, decide_promotion
from bonemet.serving import FeatureInputError, check_feature_frame

FEATURES = [f"original_firstorder_F{i}" for i in range(6)]
#: the train stage's run ids (train.metrics_dir / TRAIN_RUNS_FILE), relative to the test's folder
TRAIN_RUNS = Path("metrics") / TRAIN_RUNS_FILE


def _table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, len(FEATURES))) + y[:, None] * np.linspace(0, 1.5, len(FEATURES))
    df = pd.DataFrame(X, columns=FEATURES)
    df.insert(0, "case_id", [f"case_{i:03d}" for i in range(n)])
    df.insert(1, "label", y)
    return df


def test_gate_is_in_the_registry_not_in_serving():
    import bonemet.serving

    assert not hasattr(bonemet.serving, "decide_promotion")  # serving imports no tracking backend


GATE = dict(min_auc=0.7, min_auc_lower_bound=0.6, min_sensitivity=0.5, min_specificity=0.5, tolerance=0.02,
            max_gap_to_best=0.03, model="svm", families={})


def _est(auc=0.85, lo=0.75, sens=0.7, spec=0.8, data="d1"):
    return Estimate(auc_mean=auc, auc_lower_bound=lo, sensitivity=sens, specificity=spec, data_md5=data)


def test_gate_rules():
    assert decide_promotion(_est(), None, **GATE).promote
    for bad, why in ((_est(auc=0.65), "mean test AUC 0.650 < 0.700"), (_est(lo=0.55), "lower bound 0.550 < 0.600"),
                     (_est(sens=0.2), "mean sensitivity 0.200 < 0.500"), (_est(spec=0.1), "specificity 0.100"),
                     (_est(auc=float("nan")), "not a number")):
        decision = decide_promotion(bad, None, **GATE)
        assert not decision.promote and why in decision.reason, decision.reason
    # several failures are all named
    assert decide_promotion(_est(sens=0.2, spec=0.1), None, **GATE).reason.count("<") == 2
    # same data: compared with staging
    held = decide_promotion(_est(auc=0.80), _est(auc=0.85), **GATE)
    assert not held.promote and "worse than staging" in held.reason and held.compared_with_staging
    within = decide_promotion(_est(auc=0.84), _est(auc=0.85), **GATE)
    assert within.promote and within.compared_with_staging
    # other data: not compared, and the reason says why
    other = decide_promotion(_est(auc=0.80), _est(auc=0.95, data="d2"), **GATE)
    assert other.promote and not other.compared_with_staging and "evaluated on other data" in other.reason


def test_gate_refuses_a_family_far_below_the_best_and_names_who_would_pass():
    gate = {**GATE, "families": {"svm": _est(auc=0.80), "logreg": _est(auc=0.85), "knn": _est(auc=0.84, sens=0.2),
                                 "mlp": _est(auc=0.81), "xgboost": _est(auc=0.83)}}
    held = decide_promotion(_est(auc=0.80), None, **gate)
    assert not held.promote, held.reason
    assert "svm's mean test AUC 0.800 is 0.050 below logreg's 0.850 (more than register.max_gap_to_best 0.030)" \
        in held.reason
    # logreg and xgboost pass (knn misses the sensitivity minimum, mlp is 0.04 below the best)
    assert held.reason.endswith("would pass: logreg, xgboost (set register.model)"), held.reason
    # within the gap: promoted, and the reason says how far from the best it is
    near = decide_promotion(_est(auc=0.83), None, **{**gate, "families": {**gate["families"], "svm": _est(auc=0.83)}})
    assert near.promote and "within 0.030 of the best family logreg (0.850)" in near.reason
    # the best family itself, and a wider gap
    assert "the best family" in decide_promotion(_est(auc=0.90), None, **{**gate, "families": {
        "svm": _est(auc=0.90), "logreg": _est(auc=0.85)}}).reason
    assert decide_promotion(_est(auc=0.80), None, **{**gate, "max_gap_to_best": 0.06}).promote
    # a minimum missed: the families that would pass are named too
    low = decide_promotion(_est(auc=0.65), None, **{**gate, "families": {"svm": _est(auc=0.65), "logreg": _est()}})
    assert not low.promote and "mean test AUC 0.650 < 0.700" in low.reason and "would pass: logreg" in low.reason


def test_feature_checks_name_the_problem():
    df = _table(4)
    out = check_feature_frame(df, FEATURES)
    assert list(out.columns) == FEATURES and out.dtypes.unique().tolist() == [np.float64]
    with pytest.raises(FeatureInputError, match="empty input"):
        check_feature_frame(df.iloc[:0], FEATURES)
    with pytest.raises(FeatureInputError, match="missing 1 of the 6 columns the model reads: original_firstorder_F2"):
        check_feature_frame(df.drop(columns=[FEATURES[2]]), FEATURES)
    with pytest.raises(FeatureInputError, match="unknown columns: bogus"):
        check_feature_frame(df.assign(bogus=1.0), FEATURES)
    bad = df.copy()
    bad[FEATURES[1]] = bad[FEATURES[1]].astype(object)
    bad.loc[2, FEATURES[1]] = "abc"
    with pytest.raises(FeatureInputError, match=rf"non-numeric.*{FEATURES[1]} \(row 2\)"):
        check_feature_frame(bad, FEATURES)
    nan = df.copy()
    nan.loc[3, FEATURES[4]] = np.nan
    with pytest.raises(FeatureInputError, match=f"NaN or infinite.*{FEATURES[4]}.*row\\(s\\) 3"):
        check_feature_frame(nan, FEATURES)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The client of a local store in ``tmp_path/mlruns`` (the working folder is ``tmp_path``)."""
    from bonemet.registry.store import client

    monkeypatch.chdir(tmp_path)
    return client(None, tmp_path / "mlruns")


def _tracker(experiment):
    """A tracker on the ``store`` fixture's store (``mlruns`` in the working folder)."""
    from bonemet.registry.store import MlflowTracker

    return MlflowTracker(experiment, tracking_uri=None, store_dir="mlruns", system_metrics=False,
                         system_metrics_interval_s=None)


def _domain(pipeline, df):
    """The training domain the train stage writes next to each pipeline."""
    from bonemet.config import load_specs
    from bonemet.modeling.domain import fit_training_domain

    spec = load_specs(Path(__file__).resolve().parents[1] / "params.yaml").train.domain
    return fit_training_domain(pipeline, df[FEATURES], np.arange(len(df)) % 3, spec, seed=0)


def _train_outputs(models_dir, aucs, run="a", rule="svm"):
    """What the train stage leaves in ``models_dir`` for the register stage.

    ``aucs``: {model: (outer-fold CV AUCs, test AUC)}, in train.models order. Each model gets a
    fitted (scikit-learn) pipeline in ``<model>.skops``; ``index.json`` names the best one by
    :func:`choose_best_model` (CV AUC, never the test AUC), the registered one by ``rule``
    (``register.model``: :func:`choose_registered_model`) and ``metrics/train_runs.json`` its run ids.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    df = _table()
    entries = {}
    for k, (name, (folds, test_auc)) in enumerate(aucs.items()):
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1 * (k + 1))).fit(df[FEATURES], df["label"])
        save_pipeline(pipe, models_dir / f"{name}.skops")
        save_pipeline(_domain(pipe, df), models_dir / domain_file(name))
        entries[name] = {"path": f"{name}.skops", "cv_auc_mean": float(np.mean(folds)),
                         "cv_auc_sd": float(np.std(folds, ddof=1)), "test_auc": test_auc, "threshold": 0.4 + 0.1 * k,
                         "params": {"C": 0.1 * (k + 1)}}
    cv = {m: f for m, (f, _) in aucs.items()}
    index = {"best_model": choose_best_model(cv, list(aucs)),
             "registered_model": choose_registered_model(rule, cv, list(aucs)), "registered_rule": rule,
             "registered_by": registered_rule_text(rule),
             "best_by": "cv_auc_mean (ties: lower cv_auc_sd, then the order of train.models)",
             "feature_source": "auto", "feature_names": FEATURES, "models": entries}
    provenance = {"train_run_id": f"train-{run}",
                  "models": {m: {"run_id": f"{m}-{run}", "seconds": {"total_s": 1.0}} for m in aucs}}
    (models_dir / "index.json").write_text(json.dumps(index))
    TRAIN_RUNS.parent.mkdir(parents=True, exist_ok=True)
    TRAIN_RUNS.write_text(json.dumps(provenance))
    return df


def _repeated(estimates, path=None, registered="svm"):
    """What the evaluate stage writes (``repeated.json``): ``estimates`` {model: (mean AUC, lower bound,
    sensitivity, specificity)}; the registered model's rule (a family named) chose ``registered``
    in every repeat, so its estimate (``chosen``) is that family's."""
    models = {m: {"auc": {"mean": a, "lo": lo, "hi": None}, "sensitivity_mean": se, "specificity_mean": sp}
              for m, (a, lo, se, sp) in estimates.items()}
    doc = {"n_repeats": 10, "models": models, "registered_model": registered, "registered_rule": registered,
           "chosen": models[registered], "best_repeated_model": best_by_repeats({"models": models}, list(estimates))}
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc))
    return doc


def _register(models_dir, df, reg, repeated, data_md5="d41d8", **kw):
    """register_classifier on the train and evaluate outputs, as the register stage calls it."""
    from bonemet.registry.registration import register_classifier

    index = json.loads((Path(models_dir) / "index.json").read_text())
    classifier = index["registered_model"]
    args = dict(tracker=_tracker(reg.experiment), model_name=reg.model_name, classifier=classifier,
                index=index, provenance=json.loads(TRAIN_RUNS.read_text()),
                repeated=repeated, pipeline=load_pipeline(Path(models_dir) / index["models"][classifier]["path"]),
                domain=load_pipeline(Path(models_dir) / domain_file(classifier)), check_rows=df, min_auc=reg.min_auc, min_auc_lower_bound=reg.min_auc_lower_bound,
                min_sensitivity=reg.min_sensitivity, min_specificity=reg.min_specificity,
                tolerance=reg.tolerance, max_gap_to_best=reg.max_gap_to_best, alias=reg.alias,
                description_extra="\nTable 1:\n| svm | test | 0.900 |", tags={"data_md5": data_md5, "git_commit": "abc"})
    args.update(kw)
    return register_classifier(**args)


@pytest.fixture
def reg(params):
    """params.yaml's register section: bonemet-classifier, alias staging, gate 0.70 / 0.60 / 0.5 / 0.5, 0.02."""
    r = params.registration
    assert (r.min_auc, r.min_auc_lower_bound, r.min_sensitivity, r.min_specificity, r.tolerance) == (
        0.7, 0.6, 0.5, 0.5, 0.02)
    return r


def test_register_best_gate_and_pyfunc_input_checks(store, reg):
    from mlflow.exceptions import MlflowException

    from bonemet.registry.store import alias_version, load_model, model_versions

    # svm has the best CV AUC and the best repeated AUC, knn the best committed-split test AUC:
    # the repeated estimate names the registered model
    df = _train_outputs("models", {"svm": ([0.92, 0.94], 0.90), "knn": ([0.84, 0.86], 0.95)})
    repeated = _repeated({"svm": (0.88, 0.80, 0.75, 0.85), "knn": (0.84, 0.76, 0.7, 0.8)})
    first = _register("models", df, reg, repeated)
    assert first.classifier == "svm" and first.promoted and first.version == "1"
    assert (first.cv_auc_mean, first.test_auc, first.threshold) == (pytest.approx(0.93), 0.90, 0.4)
    assert (first.repeated_auc_mean, first.repeated_auc_lo) == (0.88, 0.80)
    assert first.source_run_id == "svm-a"  # train_runs.json links the version to the train stage's run
    assert alias_version(store, reg.model_name, reg.alias) == "1"
    [v1] = model_versions(store, reg.model_name)
    assert "test AUC 0.900" in v1["description"] and v1["tags"]["data_md5"] == "d41d8"
    assert "repeated test AUC over 10 splits 0.880 (corrected lower bound 0.800)" in v1["description"]
    assert "registered by register.model svm" in v1["description"] and v1["tags"]["registered_rule"] == "svm"
    assert (v1["tags"]["repeated_auc_mean"], v1["tags"]["threshold"]) == ("0.880000", "0.400000")
    assert "(train run train-a)" in v1["description"] and "Table 1:" in v1["description"]
    assert v1["tags"]["source_run_id"] == "svm-a" and v1["tags"]["classifier"] == "svm"
    assert v1["aliases"] == ["staging"]
    # the decision is recorded in a `register` run with the train run's ids
    register_run = store.get_run(v1["run_id"])
    assert register_run.info.run_name == "register"
    assert register_run.data.tags["train_run_id"] == "train-a" and register_run.data.tags["gate_decision"] == "promote"
    assert (register_run.data.tags["registered_model"], register_run.data.tags["registered_rule"]) == ("svm", "svm")

    # A worse new version on the same data is registered but does not take the alias.
    df = _train_outputs("models", {"svm": ([0.89, 0.91], 0.80)}, run="b")
    second = _register("models", df, reg, _repeated({"svm": (0.83, 0.75, 0.7, 0.8)}))
    assert second.version == "2" and not second.promoted and second.compared_with_staging
    assert "worse than staging" in second.reason and second.staging_version == "1"
    assert alias_version(store, reg.model_name, reg.alias) == "1"
    assert store.get_run(model_versions(store, reg.model_name)[1]["run_id"]).data.tags["gate_decision"] == "hold"
    # The same numbers on other data are not compared with staging's: the reason says so.
    third = _register("models", df, reg, _repeated({"svm": (0.83, 0.75, 0.7, 0.8)}), data_md5="other")
    assert third.promoted and not third.compared_with_staging and "evaluated on other data" in third.reason
    assert alias_version(store, reg.model_name, reg.alias) == "3"

    model = load_model(store, "models:/bonemet-classifier@staging")
    out = model.predict(df.head(3))
    assert list(out.columns) == ["case_id", "probability_breast", "label", "in_domain", "domain_reasons"]
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


def test_the_best_repeated_family_ties_go_to_the_lower_bound_then_the_order():
    assert _repeated({"svm": (0.85, 0.70, 0.7, 0.7), "knn": (0.85, 0.75, 0.7, 0.7)})["best_repeated_model"] == "knn"
    assert _repeated({"svm": (0.85, 0.75, 0.7, 0.7), "knn": (0.85, 0.75, 0.7, 0.7)})["best_repeated_model"] == "svm"
    assert _repeated({"svm": (None, None, 0.7, 0.7), "knn": (0.60, 0.5, 0.7, 0.7)})["best_repeated_model"] == "knn"


def test_the_registered_model_is_the_rule_never_a_test_set():
    cv = {"svm": [0.80, 0.82], "logreg": [0.90, 0.92], "knn": [0.86, 0.96]}
    order = list(cv)
    assert choose_registered_model("svm", cv, order) == "svm"  # named: the study's model, whatever the others do
    assert choose_registered_model("best_cv", cv, order) == "logreg"  # tie on the mean: the lower sd
    with pytest.raises(ValueError, match="register.model 'mlp' was not trained"):
        choose_registered_model("mlp", cv, order)
    assert "no test set" in registered_rule_text("best_cv") and "svm" in registered_rule_text("svm")


def test_register_holds_a_family_far_below_the_best_and_names_who_would_pass(store, reg):
    df = _train_outputs("models", {"svm": ([0.80, 0.82], 0.78), "knn": ([0.84, 0.86], 0.95)})
    held = _register("models", df, reg, _repeated({"svm": (0.76, 0.70, 0.7, 0.7), "knn": (0.84, 0.76, 0.7, 0.8)}))
    assert held.classifier == "svm" and held.registered_rule == "svm" and not held.promoted
    assert "0.080 below knn's 0.840" in held.reason and "would pass: knn" in held.reason
    assert held.best_repeated_model == "knn"


def test_register_holds_the_alias_when_the_repeated_auc_is_undefined(store, reg):
    df = _train_outputs("models", {"svm": ([0.92, 0.94], None)})
    result = _register("models", df, reg, _repeated({"svm": (None, None, 0.7, 0.8)}))
    assert not result.promoted and "not a number" in result.reason


def _stage_params(tmp_path, df, model="svm"):
    """params.yaml for `bonemet register` in ``tmp_path``: the train outputs in models/, a feature table,
    register.model ``model``."""
    import yaml

    from bonemet.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["tracking"]["store_dir"] = "mlruns"
    params["register"].update(model=model, out="metrics/registry.json")
    params["radiomics"]["out_dir"] = "features"  # the feature table of train.feature_source (auto) is read there
    (tmp_path / "features").mkdir(exist_ok=True)
    df.to_parquet(tmp_path / "features" / "auto.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def test_register_stage_reads_the_train_outputs_and_writes_its_metrics(store, tmp_path, monkeypatch, capsys,
                                                                       caplog):
    from bonemet.cli import main
    from bonemet.registry.store import alias_version, model_versions

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    df = _train_outputs("models", {"svm": ([0.92, 0.94], 0.90), "knn": ([0.84, 0.86], 0.95)})
    _repeated({"svm": (0.88, 0.80, 0.75, 0.85), "knn": (0.84, 0.76, 0.7, 0.8)}, tmp_path / "metrics" / "repeated.json")
    _stage_params(tmp_path, df)
    assert main(["register"]) == 0
    assert "bonemet-classifier version 1 (svm, register.model svm): promoted to 'staging'" in capsys.readouterr().out
    summary = json.loads((tmp_path / "metrics" / "registry.json").read_text())
    assert summary["classifier"] == "svm" and summary["version"] == "1" and summary["promoted"] == 1
    assert summary["source_run_id"] == "svm-a" and summary["test_auc"] == 0.90
    assert alias_version(store, "bonemet-classifier", "staging") == "1"
    [version] = model_versions(store, "bonemet-classifier")
    assert "Table 1" not in version["description"]  # no metrics/table1.md: registered without it
    assert summary["registered_rule"] == "svm" and summary["best_repeated_model"] == "svm"
    # `bonemet models` names the registered family and the rule that chose it
    assert main(["models", "--model", "bonemet-classifier"]) == 0
    listing = capsys.readouterr().out
    assert "aliases=staging" in listing and "svm (register.model svm)" in listing, listing

    # no train outputs: one line naming the folder and the fix, exit 1
    for path in (tmp_path / "models" / "index.json", tmp_path / TRAIN_RUNS):
        path.unlink()
    caplog.clear()
    assert main(["register"]) == 1
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.exc_info is None and "run `bonemet train` and `bonemet evaluate` first" in error.getMessage()
    assert error.getMessage().startswith("models/index.json, metrics/train_runs.json or metrics/repeated.json cannot be read")
    assert len(model_versions(store, "bonemet-classifier")) == 1


def test_register_stage_from_a_real_train_run(store, tmp_path, monkeypatch, params):
    """The contract between the stages: run_training's own models/ registers as it is."""
    from bonemet.cli import main
    from bonemet.modeling.training import run_training, write_training_domains
    from bonemet.registry.store import model_versions

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    df = _table(n=60)
    paired = df.copy()
    paired[FEATURES] = df[FEATURES] + np.random.default_rng(1).normal(scale=0.05, size=(60, len(FEATURES)))
    ids = list(df["case_id"])
    test = ids[::3]
    train_ids = [i for i in ids if i not in test]
    splits = {"train": train_ids, "test": test, "train_folds": {c: k % 3 for k, c in enumerate(train_ids)}}
    train = params.train.updated({"models": ["logreg"], "n_trials": {"logreg": 0}, "inner_folds": 3,
                                  "log_models": False, "log_figures": False, "write_figures": False,
                                  "out_dir": "models", "metrics_dir": "metrics", "plots_dir": "plots"})
    select = params.select.updated({"lasso.cv": 3, "lasso.max_features": 4})
    res = run_training(df, paired, splits, select=select, train=train, evaluate=params.evaluate, seed=0,
                       feature_source="auto", registered_rule="best_cv")
    write_training_domains({m: r.pipeline for m, r in res.models.items()}, df, splits, train,
                           validation_report="data/validation/report.json", seed=0)
    _repeated({"logreg": (0.9, 0.8, 0.8, 0.8)}, tmp_path / "metrics" / "repeated.json", registered="logreg")
    _stage_params(tmp_path, df)  # register.model svm: not what models/ were trained for
    assert main(["register"]) == 1
    _stage_params(tmp_path, df, model="best_cv")
    assert main(["register"]) == 0
    summary = json.loads((tmp_path / "metrics" / "registry.json").read_text())
    assert summary["classifier"] == "logreg" == res.best_model == res.registered_model
    assert summary["registered_rule"] == "best_cv" and "highest mean ten-fold CV AUC" in summary["registered_by"]
    assert summary["test_auc"] == pytest.approx(res.models["logreg"].test_metrics["auc"])
    [version] = model_versions(store, "bonemet-classifier")
    assert "Table 1:" in version["description"]  # the train stage's metrics/table1.md


def test_register_stage_needs_the_training_domain(store, tmp_path, monkeypatch, caplog):
    from bonemet.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    df = _train_outputs("models", {"svm": ([0.92, 0.94], 0.90)})
    _repeated({"svm": (0.88, 0.80, 0.75, 0.85)}, tmp_path / "metrics" / "repeated.json")
    _stage_params(tmp_path, df)
    (tmp_path / "models" / domain_file("svm")).unlink()
    assert main(["register"]) == 1
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "svm.domain.skops not found" in error.getMessage() and "run `bonemet train`" in error.getMessage()


def _serve(store, log_path, workers=1):
    """`mlflow models serve` of bonemet-classifier@staging on a free loopback port, once it answers /ping."""
    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/bonemet-classifier@staging",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return proc, port, log
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    proc.terminate()
    log.close()
    pytest.fail("server did not start: " + Path(log_path).read_text()[-2000:])


def _split(frame: pd.DataFrame, **extra) -> str:
    split = frame.to_dict(orient="split")
    split.pop("index", None)
    return json.dumps({"dataframe_split": split, **extra})


@pytest.mark.slow
def test_mlflow_models_serve_1316_columns_behaviour(store, tmp_path, params):
    """The served model over HTTP: 400 naming the problem (never 500, never the values), bit-equal
    answers for 1, 3 and 20 rows, case_id, threshold, in_domain; ignored columns really ignored."""
    from bonemet.registry.pyfunc import log_classifier
    from bonemet.registry.store import register_model, set_alias
    from serving_data import NAMES, VOLUME, feature_tables, fitted_domain, fitted_model

    primary, paired = feature_tables(n=60, seed=0)
    fitted = fitted_model(primary, paired, params)
    domain = fitted_domain(fitted, primary, params.train.domain)
    tracker = _tracker("serve-test")
    with tracker.run("register"):
        info = log_classifier(tracker, fitted, NAMES, threshold=0.5, model_name="logreg", domain=domain,
                              check_rows=primary)
    set_alias(store, "bonemet-classifier", "staging", register_model(store, info, "bonemet-classifier"))
    assert info.metadata["serving_mode"] == "reduced"
    selected = list(fitted.pipeline.named_steps["lasso"].get_feature_names_out())
    ignored = next(c for c in NAMES if c not in selected and c != VOLUME)
    proc, port, log = _serve(store.tracking_uri, tmp_path / "serve.log")
    try:
        new, _ = feature_tables(n=20, seed=5)  # rows the model never saw
        for n in (1, 3, 20):
            rows = new.head(n).drop(columns=["label"])
            status, body = _post(port, _split(rows))
            assert status == 200, body
            got = [p["probability_breast"] for p in body["predictions"]]
            assert got == fitted.predict_proba(rows[NAMES])[:, 1].tolist()  # bit for bit (JSON floats round-trip)
            assert [p["case_id"] for p in body["predictions"]] == rows["case_id"].tolist()
            assert all(p["in_domain"] is (not p["domain_reasons"]) for p in body["predictions"])
        records = json.dumps({"dataframe_records": new.head(2).to_dict(orient="records")})  # label passes through
        assert [p["probability_breast"] for p in _post(port, records)[1]["predictions"]] == \
            fitted.predict_proba(new.head(2)[NAMES])[:, 1].tolist()
        one = new.iloc[[2]].drop(columns=["label", "case_id"])  # P about 0.5
        p = float(fitted.predict_proba(one[NAMES])[0, 1])
        assert _post(port, _split(one, params={"threshold": p}))[1]["predictions"][0]["label"] == 1
        above = float(np.nextafter(p, 2.0))
        assert _post(port, _split(one, params={"threshold": above}))[1]["predictions"][0]["label"] == 0
        # accepted: an ignored column missing or holding text; a 300 mL region is out of domain
        assert _post(port, _split(one.drop(columns=[ignored])))[0] == 200
        assert _post(port, _split(one.astype({ignored: object}).assign(**{ignored: "n/a"})))[0] == 200
        status, body = _post(port, _split(one.assign(**{VOLUME: 300_000.0})))
        [answer] = body["predictions"]
        assert status == 200 and answer["in_domain"] is False
        assert any(r.startswith("lesion volume 300 mL is above") for r in answer["domain_reasons"])

        def with_value(column, value):
            payload = json.loads(_split(one))
            payload["dataframe_split"]["data"][0][payload["dataframe_split"]["columns"].index(column)] = value
            return json.dumps(payload)

        duplicated = json.loads(_split(one))
        duplicated["dataframe_split"]["columns"].append(selected[0])
        duplicated["dataframe_split"]["data"][0].append(1.0)
        # a short row: pandas pads it with nulls, here in a column the model reads
        ragged = json.loads(_split(new.head(2)[[c for c in new.columns if c != selected[0]] + [selected[0]]]))
        ragged["dataframe_split"]["data"][1] = ragged["dataframe_split"]["data"][1][:-1]
        bad = {
            "unknown column": (_split(one.assign(bogus=1.0)), "unknown columns: bogus"),
            "duplicate column": (json.dumps(duplicated), f"duplicate columns: {selected[0]}"),
            "missing selected": (_split(one.drop(columns=[selected[0]])), f"model reads: {selected[0]}"),
            "text in selected": (with_value(selected[0], "12.5"), "non-numeric values (text, true/false) in 1"),
            "true in selected": (with_value(selected[0], True), selected[0]),
            "null in selected": (with_value(selected[0], None), "null"),
            "NaN token": (_split(one).replace(json.dumps(float(one[selected[0]].iloc[0])), "NaN", 1), "NaN"),
            "threshold out of range": (_split(one, params={"threshold": 1.5}), "threshold must be within [0, 1]"),
            "threshold not a number": (_split(one, params={"threshold": "abc"}), "threshold"),
            "no rows": (json.dumps({"dataframe_split": {"columns": NAMES, "data": []}}), ""),
            "short row": (json.dumps(ragged), f"({selected[0]}) at row(s) 1"),
            "not JSON": ("{{{", ""),
            "empty body": ("", ""),
        }
        secret = repr(float(one[NAMES[0]].iloc[0]))  # the first column: pandas shows it in a frame's repr
        for what, (payload, message) in bad.items():
            status, body = _post(port, payload)
            assert status == 400, f"{what}: HTTP {status}: {body}"
            assert message in body, f"{what}: {body}"
            assert secret[:8] not in body, f"{what} echoes the input: {body}"  # nor rounded, as pandas prints
        assert _post(port, _split(one))[0] == 200  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_serve_stage_runs_one_worker_per_core(store, tmp_path, monkeypatch, reg):
    import subprocess as sp

    from bonemet.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    df = _train_outputs("models", {"svm": ([0.92, 0.94], 0.90)})
    _register("models", df, reg, _repeated({"svm": (0.88, 0.80, 0.75, 0.85)}))
    _stage_params(tmp_path, df)
    calls = []
    monkeypatch.setattr(sp, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert main(["serve", "--port", "5009"]) == 0
    [(cmd, env)] = calls
    assert cmd[1:4] == ["models", "serve", "-m"] and cmd[4] == "models:/bonemet-classifier@staging"
    assert cmd[cmd.index("-w") + 1] == "4" and cmd[cmd.index("-p") + 1] == "5009"
    assert env["OMP_NUM_THREADS"] == "1" and env["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
    calls.clear()
    assert main(["serve", "--workers", "2"]) == 0
    assert calls[0][0][calls[0][0].index("-w") + 1] == "2" and calls[0][1]["OMP_NUM_THREADS"] == "2"
