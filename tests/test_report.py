"""The report tells the study's story from the stages' outputs, as a reader sees it in a browser.

The full report (every section with real data) is checked on the smoke run's output in
tests/test_pipeline_smoke.py; here the formatting rules, the choice of example cases, the
params comparison, and a report of a run that stopped after validation (it still builds, in
the study's order, and names what is missing), opened in headless Chromium.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bonemet.report.content import example_cases, params_differences, published_study, run_url, sig, with_ci
from browser import SECTION_IDS, check_report_in_browser  # noqa: E402


def test_numbers_get_three_significant_digits_and_undefined_says_so():
    assert [sig(v) for v in (0.95312, 0.9, 1.0, 0.0391, 123.46, 7, None, float("nan"))] == [
        "0.953", "0.900", "1.00", "0.0391", "123", "7", "n/a", "n/a"]
    assert with_ci(0.8412, 0.7033, 0.9741) == "0.841 (0.703\u20130.974)"
    assert with_ci(0.8412, None, 0.9) == "0.841"


def test_example_cases_are_the_best_and_the_worst_by_dice_then_the_median():
    cases = pd.DataFrame({"case_id": [f"C{i}" for i in range(9)], "dice": [0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.6, 0.2, 0.4]})
    picks = example_cases(cases, [], 3)
    assert [cid for cid, _ in picks] == ["C1", "C2", "C0"]
    assert picks[0][1] == "best Dice (0.900)" and picks[1][1] == "worst Dice (0.100)"
    assert picks[2][1] == "50th percentile of Dice (0.500)"
    # no per-case Dice (external masks without manual ones, or no segmentation yet): the cohort's first cases
    assert example_cases(None, ["A", "B", "C"], 2) == [("A", ""), ("B", "")]


def test_params_differences_list_changed_added_and_removed_keys():
    current = {"split": {"test_size": 0.4, "n_folds": 10}, "new": 1}
    baseline = {"split": {"test_size": 0.3, "n_folds": 10}, "old": [1, 2]}
    assert params_differences(current, baseline) == [["new", "1", "(absent)"], ["old", "(absent)", "1, 2"],
                                                     ["split.test_size", "0.4", "0.3"]]
    assert params_differences(current, current) == []
    assert params_differences(current, None) is None


def test_the_published_study_ships_with_the_package_for_every_model():
    paper = published_study()
    assert paper["doi"] == "10.1016/j.jbo.2024.100638" and paper["segmentation"]["dice_mean"] == 0.915
    from bonemet.modeling.classifiers import DISPLAY_NAMES

    assert set(paper["table1"]) == set(DISPLAY_NAMES)
    assert paper["table1"]["svm"]["test"]["auc"] == 0.953 and paper["table1"]["xgboost"]["train"]["auc"] == 0.983


def test_run_links_need_a_ui_address():
    assert run_url(None, "abc") is None
    assert run_url("http://127.0.0.1:5000/", "abc") == "http://127.0.0.1:5000/#/runs/abc?workflowType=machine_learning"


@pytest.fixture
def validated_cohort(tmp_path, params_file):
    """A 4-case synthetic cohort, validated (the report's first input), in a git repository whose
    committed params.yaml is the project's."""
    from bonemet.cli import main

    params = params_file({"data": {"cohort_dir": "cohort"}})
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "params.yaml"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "p"],
                   check=True)
    assert main(["synth", "--params", str(params), str(tmp_path / "cohort"), "--small", "--n", "4",
                 "--no-progress"]) == 0
    assert main(["validate", "--params", str(params), str(tmp_path / "cohort"), "--report",
                 str(tmp_path / "data" / "validation"), "--no-progress"]) == 0
    return tmp_path


def test_a_report_after_validation_only_builds_in_order_and_names_what_is_missing(validated_cohort, monkeypatch,
                                                                                   tmp_path):
    from bonemet.cli import main

    monkeypatch.chdir(validated_cohort)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["split"]["test_size"] = 0.25  # an experiment's change: listed in the provenance section
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert main(["report", "--no-tracking"]) == 0
    page = Path(params["report"]["out"])
    text = page.read_text(encoding="utf-8")
    positions = [text.index(f'<section id="{sid}">') for sid in SECTION_IDS]
    assert positions == sorted(positions), "sections out of the study's order"
    assert 'id="plan"' not in text  # no data/plan.json: no plan section
    assert "4 cases" in text and "Passed" in text
    assert "Not available: metrics/segmentation.json" in text and "Not available: metrics/table1.json" in text
    assert "<td>split.test_size</td><td>0.25</td><td>0.3</td>" in text
    assert not re.search(r"(src|href)=['\"]https?://", text), "the page must not load anything from the network"
    assert "No model is registered yet." in text  # the summary section says so before any classifier ran
    # a file that is not a plan of this bonemet: the section says so and links to it
    Path("data/plan.json").write_text(json.dumps({"spacing_mm": [1.5, 1.5, 1.5], "batch_size": 2}))
    assert main(["report", "--no-tracking", "--out", "with_plan.html"]) == 0
    with_plan = Path("with_plan.html").read_text(encoding="utf-8")
    assert '<section id="plan">' in with_plan and "holds no planned values" in with_plan
    assert '<a href="data/plan.json">' in with_plan
    check_report_in_browser(page.resolve(), tmp_path / "screenshots")


def _plan() -> dict:
    """A plan.json as the plan stage writes it (every setting planned: params.yaml leaves them auto)
    for 30 hand-made cases: two slice thicknesses, lesions of 8-37 mm."""
    import numpy as np

    from bonemet.config import load_specs
    from bonemet.planning import PlanInputs, make_plan
    from bonemet.planning.fingerprint import CaseFingerprint, CohortFingerprint

    cases = []
    for i in range(30):
        spacing = (0.7 + 0.01 * i, 0.7 + 0.01 * i, 1.0 if i % 2 else 2.5)
        extent = (8.0 + i, 7.0 + i, 6.0 + i)
        hu = np.linspace(300 + 10 * i, 1200 + 10 * i, 60, dtype=np.float32)
        cases.append(CaseFingerprint(
            case_id=f"c{i:02d}", spacing_mm=spacing, size_vox=tuple(int(90 / s) for s in spacing), lesion_voxels=500,
            lesion_volume_ml=0.5 + 0.1 * i, lesion_extent_mm=extent, lesion_hu_median=float(np.median(hu)),
            bone_box_extent_mm=(60.0, 55.0, 70.0), lesion_fraction_image=0.01, lesion_fraction_bone_box=0.03,
            lesion_hu_sample=hu, bone_hu_sample=np.concatenate([hu - 600, hu]), image=f"images/c{i:02d}.nii.gz"))
    params = load_specs(Path(__file__).resolve().parents[1] / "params.yaml")
    return make_plan(CohortFingerprint(tuple(cases)), PlanInputs.from_params(params))


def _classifier_outputs(metrics: Path) -> str:
    """What train, evaluate and register leave for the report when the SVM is registered (register.model
    svm), logistic regression is best by CV and has the highest repeated AUC, and the gate held the SVM:
    Table 1, repeated.json, summary.json (the evaluate stage's own headline) and registry.json.
    Returns the registered model's display name."""
    import numpy as np

    from bonemet.modeling.evaluation import binary_metrics
    from bonemet.modeling.repeated import headline as _headline
    from bonemet.modeling.table1 import build_table1, write_table1
    from bonemet.modeling.training import RESUBSTITUTION, registered_rule_text

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    sets = {m: {s: binary_metrics(y, y * shift + rng.normal(size=40), 0.5, alpha=0.05, n_boot=20, seed=0,
                                  auc_ci="normal") for s in ("train", "test")}
            for m, shift in (("svm", 1.0), ("logreg", 1.5), ("knn", 0.8))}
    table = build_table1(sets, best_model="logreg", registered_model="svm", registered_by=registered_rule_text("svm"),
                         train_estimate=RESUBSTITUTION)
    write_table1(table, metrics / "table1.json", metrics / "table1.md", best_model="logreg", decimals=3, alpha=0.05)

    def interval(mean):
        return {"mean": mean, "lo": mean - 0.05, "hi": mean + 0.05, "n": 7}

    models = {m: {"auc": interval(a), "sensitivity_mean": 0.7, "specificity_mean": 0.75, "accuracy_mean": 0.72,
                  "threshold_mean": 0.5, "times_chosen": 7 if m == "svm" else 0}
              for m, a in (("svm", 0.80), ("logreg", 0.86), ("knn", 0.78))}
    repeated = {"n_repeats": 7, "n_train": 124, "n_test": 54, "interval": "corrected resampled t", "models": models,
                "chosen": {"auc": interval(0.80), "sensitivity_mean": 0.7, "specificity_mean": 0.75},
                "registered_model": "svm", "registered_rule": "svm", "registered_by": registered_rule_text("svm"),
                "best_cv_model": "logreg", "best_repeated_model": "logreg", "repeats": [],
                "baseline": {"model": "L1", "auc": interval(0.84),
                             "chosen_minus_baseline": {"mean": -0.04, "lo": -0.09, "hi": 0.01, "n": 7}}}
    (metrics / "repeated.json").write_text(json.dumps(repeated))
    table1 = json.loads((metrics / "table1.json").read_text())
    headline = _headline(repeated, {"best_model": "logreg"}, table1, metrics / "none.json")
    (metrics / "summary.json").write_text(json.dumps(headline))
    (metrics / "registry.json").write_text(json.dumps({
        "model_name": "bonemet-classifier", "version": "4", "classifier": "svm", "registered_rule": "svm",
        "registered_by": registered_rule_text("svm"), "threshold": 0.5, "cv_auc_mean": 0.8, "test_auc": 0.79,
        "repeated_auc_mean": 0.80, "repeated_auc_lo": 0.75, "best_repeated_model": "logreg", "promoted": 0,
        "reason": "held: svm's mean test AUC 0.800 is 0.060 below logreg's 0.860 (more than register.max_gap_to_best "
                  "0.030); would pass: logreg (set register.model)", "compared_with_staging": False,
        "staging_version": None, "source_run_id": ""}))
    return "SVM"


def test_the_report_tells_one_story_of_the_registered_model_and_a_short_plan(validated_cohort, monkeypatch, tmp_path):
    """In Chromium: the plan section is a short table (<= 20 rows) with the fingerprint figure and a link
    to the full plan; the registered model's name is in the summary, classifier and registry sections,
    the rule that chose it first, and Table 1 marks it apart from the best by CV; training rows say
    they are resubstitution."""
    from bonemet.cli import main

    monkeypatch.chdir(validated_cohort)
    Path("data/plan.json").write_text(json.dumps(_plan()))
    metrics = Path("metrics")
    metrics.mkdir()
    name = _classifier_outputs(metrics)
    assert main(["report", "--no-tracking"]) == 0
    page = Path("reports/index.html").resolve()
    html = page.read_text(encoding="utf-8")
    assert '<a href="../data/plan.json">' in html  # the full plan, one link away (relative to the page)
    seen = check_report_in_browser(page, tmp_path / "screenshots")
    text, rows = seen["section_text"], seen["section_rows"]
    assert 5 <= rows["plan"] <= 20, rows["plan"]
    plan_text = text["plan"]
    for setting in ("preprocess.target_spacing_mm", "preprocess.hu_window", "segment.roi_size",
                    "segment.train.batch_size", "segment.train.max_steps"):
        assert setting in plan_text, setting
    assert "million crop voxels per fold" in plan_text
    assert "median spacing of 30 cases" in plan_text and "fingerprint.size_vox" not in plan_text
    assert any(i["alt"].startswith("Cohort fingerprint") and i["w"] for i in seen["images"])
    for section in ("summary", "classifiers", "registry"):
        assert f"{name}" in text[section], section
        assert "register.model svm" in text[section], section
    assert text["summary"].index("Registered model: SVM") < text["summary"].index("Logistic regression")
    classifiers = text["classifiers"]
    assert re.match(r"5\. Classifiers\s+Registered model: SVM, chosen by register\.model svm", classifiers)
    assert "SVM (registered)" in classifiers and "Logistic regression (best CV)" in classifiers
    assert "train (resubstitution)" in classifiers and "KNN (best CV)" not in classifiers
    assert "would pass: logreg" in text["registry"] and "0.060 below logreg's 0.860" in text["summary"]
    # the plain baseline on the same splits: the paired difference and its interval, and what it means
    assert "registered minus it, paired repeat by repeat: -0.0400 (-0.0900 to +0.0100)" in classifiers
    assert "does not beat the plain baseline" in classifiers and "beyond the interval" not in classifiers
    assert "-0.0400 (-0.0900 to +0.0100)" in text["summary"]
