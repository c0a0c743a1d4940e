"""The HTML report embeds every metrics file and figure and needs no network."""

from __future__ import annotations

import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bonemet.report import build_report  # noqa: E402
from bonemet.report.html import markdown_table  # noqa: E402


def test_report_embeds_metrics_tables_and_figures(tmp_path):
    metrics = tmp_path / "metrics"
    plots = tmp_path / "plots" / "classification"
    metrics.mkdir()
    plots.mkdir(parents=True)
    (metrics / "segmentation.json").write_text(json.dumps({"dice": {"mean": 0.912345, "sd": 0.03}}))
    (metrics / "table1.md").write_text("# Table 1\n\n| model | set | AUC |\n|---|---|---|\n| svm | test | 0.95 |\n")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    fig.savefig(plots / "roc_test.png")
    plt.close(fig)
    validation = tmp_path / "report.txt"
    validation.write_text("all 3 cases passed\n")

    out = build_report(
        tmp_path / "reports" / "index.html",
        metrics_dir=metrics,
        plot_dirs=[tmp_path / "plots" / "segmentation", plots],
        title="bonemet pipeline report",
        extra_sections=[("Validation report", validation)],
        context={"git commit": "abc123"},
    )

    page = out.read_text(encoding="utf-8")
    assert "dice.mean" in page and "0.9123" in page
    assert "<td>svm</td><td>test</td><td>0.95</td>" in page
    assert page.count("data:image/png;base64,") == 1
    assert "roc test" in page
    assert "all 3 cases passed" in page
    assert "abc123" in page
    # Self-contained: no external scripts, styles or images.
    assert not re.search(r"(src|href)=['\"]https?://", page)


def test_markdown_table_skips_separator_and_escapes():
    out = markdown_table("| a | b |\n|:--|--:|\n| <x> | 1 |\n")
    assert "<th>a</th><th>b</th>" in out
    assert "&lt;x&gt;" in out
    assert "--" not in out


def test_report_stage_takes_its_settings_from_the_params_report_section(tmp_path, monkeypatch):
    from pathlib import Path

    import yaml

    from bonemet.cli import main
    from bonemet.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["report"] = {"out": "out/report.html", "title": "Cohort <B> report", "metrics_dir": "m",
                        "plot_dirs": ["p"], "extra_sections": {"Validation report": "v.txt"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "registry.json").write_text(json.dumps({"version": "3", "promoted": 1}))
    (tmp_path / "v.txt").write_text("12 cases passed\n")
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 0
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<title>Cohort &lt;B&gt; report</title>" in page and "<h1>Cohort &lt;B&gt; report</h1>" in page
    assert "12 cases passed" in page and "Validation report" in page and "promoted" in page
    assert main(["report", "--out", "elsewhere.html"]) == 0 and (tmp_path / "elsewhere.html").is_file()
    # a misspelt key of the report section is a params error (exit 2), not a report without it
    params["report"]["extra_section"] = params["report"].pop("extra_sections")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["report"]) == 2
