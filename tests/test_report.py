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
    # the plan stage's fingerprint gets its section when the file exists
    Path("data/plan.json").write_text(json.dumps({"spacing_mm": [1.5, 1.5, 1.5], "batch_size": 2}))
    assert main(["report", "--no-tracking", "--out", "with_plan.html"]) == 0
    with_plan = Path("with_plan.html").read_text(encoding="utf-8")
    assert '<section id="plan">' in with_plan and "<td>spacing_mm</td><td>1.500, 1.500, 1.500</td>" in with_plan
    check_report_in_browser(page.resolve(), tmp_path / "screenshots")
