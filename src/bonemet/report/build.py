"""Assemble the report: read every section (``content``), render the Jinja2 template, write atomically."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bonemet.report import content
from bonemet.report.content import ReportInputs
from bonemet.utils import atomic_path

log = logging.getLogger(__name__)

#: Section ids and headings, in the study's order (the plan appears only with its file).
SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"), ("cohort", "1. Cohort"), ("plan", "Plan"), ("examples", "2. Example cases"), ("segmentation", "3. Segmentation"),
    ("radiomics", "4. Radiomics"), ("classifiers", "5. Classifiers"), ("registry", "6. Registry"),
    ("replication", "7. Replication"), ("provenance", "8. Provenance"),
)


@dataclass(frozen=True)
class Provenance:
    """Where the run came from: commit, data hash, tracking store, and the params compared with a baseline."""

    git_commit: str
    data_md5: str
    tracking_uri: str | None
    params: Mapping[str, Any]
    #: the params to compare with (None when none could be read) and what they are
    baseline_params: Mapping[str, Any] | None
    baseline_note: str


@dataclass(frozen=True)
class CaseSettings:
    """How the cohort's masks are read (``data.mask_label``, ``data.roi``/``segment``, the grid tolerance)."""

    mask_label: int
    roi: str | None
    seg_segment: int | str | None
    grid_tolerance_mm: float
    #: the key of ``data.pseudonymize`` (ids are then the stages' pseudonyms); None when off
    pseudonym_key: bytes | None


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bonemet.report", "templates"),
                             autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             undefined=jinja2.ChainableUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    return env


def render_report(
    inputs: ReportInputs,
    *,
    title: str,
    cases: CaseSettings,
    provenance: Provenance,
    method_settings: Mapping[str, str],
    example_cases: int,
    figure_dpi: int,
    store: Mapping[str, Any] | None = None,
    mlflow_ui_url: str | None = None,
    report_dir: Path | None = None,
) -> str:
    """The report's HTML.

    Args:
        inputs: the stages' output files.
        cases: how masks are read (for the example cases).
        provenance: commit, data hash, params and their baseline.
        method_settings: plain-language settings for the replication section (``lasso``,
            ``ci_methods``, ``calibration``, ``threshold_rule``, ``data``).
        example_cases: how many cases to draw with their contours.
        figure_dpi: resolution of the figures the report draws itself.
        store: what the MLflow store says (``uri``; ``models``: {name: versions as
            ``registry.store.model_versions`` lists them}), or None when no store was read.
        mlflow_ui_url: the UI address for links to runs (None: run ids only).
        report_dir: the folder the page is written to (links to files, e.g. the full plan.json, are
            relative to it); None: the paths as given.
    """
    import os

    plan_href = None
    if report_dir is not None:
        plan_href = Path(os.path.relpath(Path(inputs.plan).resolve(), Path(report_dir).resolve())).as_posix()
    segmentation = content.segmentation_section(inputs, dpi=figure_dpi)
    context = {
        "title": title,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cohort": content.cohort_section(inputs, dpi=figure_dpi, pseudonym_key=cases.pseudonym_key),
        "summary": content.summary_section(inputs),
        "plan": content.plan_section(inputs, dpi=figure_dpi, href=plan_href),
        "examples": content.examples_section(inputs, n=example_cases, mask_label=cases.mask_label,
                                             grid_tolerance_mm=cases.grid_tolerance_mm, roi=cases.roi,
                                             seg_segment=cases.seg_segment, dpi=figure_dpi,
                                             pseudonym_key=cases.pseudonym_key),
        "segmentation": segmentation,
        "radiomics": content.radiomics_section(inputs, dpi=figure_dpi),
        "classifiers": content.classifiers_section(inputs),
        "registry": content.registry_section(inputs, store, mlflow_ui_url),
        "replication": content.replication_section(inputs, dice_mean=segmentation.get("dice_mean"),
                                                   settings=method_settings),
        "provenance": {
            "git_commit": provenance.git_commit, "data_md5": provenance.data_md5,
            "rows": [["git commit", provenance.git_commit], ["data (DVC md5 of the cohort)", provenance.data_md5],
                     ["cohort folder", str(inputs.cohort_dir)],
                     ["MLflow tracking URI", provenance.tracking_uri or "(not read)"],
                     ["bonemet version", _version()]],
            "params_diff": content.params_differences(provenance.params, provenance.baseline_params),
            "baseline_note": provenance.baseline_note,
        },
    }
    context["sections"] = [(sid, heading) for sid, heading in SECTIONS if sid != "plan" or context["plan"]]
    return _environment().get_template("report.html.j2").render(**context)


def build_report(out_path: str | Path, inputs: ReportInputs, **kwargs: Any) -> Path:
    """Write :func:`render_report`'s page to ``out_path`` atomically; returns the path."""
    out_path = Path(out_path)
    page = render_report(inputs, report_dir=out_path.parent, **kwargs)
    with atomic_path(out_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("report written: %s (%d KiB)", out_path, len(page.encode("utf-8")) // 1024)
    return out_path


def _version() -> str:
    from bonemet import __version__

    return __version__


def report_inputs(params: Any) -> ReportInputs:
    """Where the report reads each stage's outputs: the paths the params sections name."""
    from bonemet.modeling import REPEATED_FILE, SUMMARY_FILE
    from bonemet.validation import REPORT_FILE

    seg, train, evaluated = params.segment, params.train, Path(params.evaluate.out_dir)
    return ReportInputs(
        cohort_dir=Path(params.data.cohort_dir), validation_report=Path(params.validation.out_dir) / REPORT_FILE,
        plan=Path(params.plan.out), segmentation_json=Path(seg.metrics), segmentation_cases=Path(seg.cases_table),
        segmentation_plots=Path(seg.plots_dir), auto_masks=Path(seg.masks_dir),
        features_dir=Path(params.radiomics.out_dir), models_dir=Path(train.out_dir),
        metrics_dir=Path(train.metrics_dir), classification_plots=Path(train.plots_dir),
        repeated_json=evaluated / REPEATED_FILE, registry_json=Path(params.registration.out),
        summary_json=evaluated / SUMMARY_FILE,
    )


def replication_settings(params: Any) -> dict[str, str]:
    """The settings the replication section states in words (``params``: the whole :class:`~bonemet.config.Params`)."""
    sel, train, ev = params.select, params.train, params.evaluate
    op = train.operating_point
    rule = {"youden": "Youden's J", "sensitivity": f"the highest threshold reaching sensitivity {op.target_sensitivity:g}",
            "fixed": f"fixed at {op.fixed_threshold:g}"}[op.rule]
    return {
        "lasso": (f"fixed at {sel.lasso.alpha:g}" if sel.lasso.alpha is not None
                  else f"chosen by {sel.lasso.cv}-fold cross-validation in each training fold ({sel.lasso.lambda_rule} rule)"),
        "ci_methods": (f"AUC by DeLong ({ev.auc_ci} form), accuracy, sensitivity, specificity, precision and NPV by the "
                       f"Wilson score interval, F1 and Brier by a stratified percentile bootstrap ({ev.n_bootstrap} "
                       f"resamples); repeated-split means by the corrected resampled t interval"),
        "calibration": train.calibration,
        "threshold_rule": rule,
        "data": ("A synthetic spine-CT cohort with the study's class balance and a known Bayes-optimal AUC (the study's "
                 "data are private)" if params.data.source == "synthetic" else
                 f"Your cohort ({params.data.cohort_dir}), not the study's private data"),
    }


def committed_params(path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """The params file as committed at git HEAD (None when git or the file is unavailable) and a note.

    The report's "Params that differ from the defaults" compares the run's params with these: under
    ``dvc exp run -S key=value`` that is exactly what the experiment changed, and on a clean
    checkout it is empty. (A copy of the defaults inside the package would be a second params file
    to keep in step with the first; the commit is what the run's ``git_commit`` names.)"""
    import os
    import subprocess

    import yaml

    rel = os.path.relpath(Path(path).resolve(), Path.cwd().resolve())
    try:
        text = subprocess.run(["git", "show", f"HEAD:./{rel}"], capture_output=True, encoding="utf-8", check=True,
                              timeout=10).stdout
        return yaml.safe_load(text), (f"Compared with {rel} as committed at git HEAD: under dvc exp run -S these "
                                      f"are the experiment's changes; on a clean checkout there are none.")
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        return None, f"{rel} is not committed in a git repository here, so there is no default to compare with."
