"""`bonemet validate COHORT_DIR [--report DIR]`: check a cohort before anything uses it.

Writes ``report.json`` and ``report.txt`` (even when the cohort fails, so it can be read),
logs the readable report, and exits 1 when a hard rule failed, naming every bad case and the
rules it broke. Soft rules only warn. The cohort folder is only read.
"""

from __future__ import annotations

import argparse
import logging

from bonemet.config import get, section
from bonemet.stages._common import params_from

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cohort_dir", help="cohort folder holding manifest.csv, images and masks")
    parser.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="folder for report.json/report.txt (default: params validate.report_dir)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from bonemet.validation.cohort import validate_cohort

    params = params_from(args)
    cfg = section(params, "validate")
    report = validate_cohort(
        args.cohort_dir,
        mask_label=int(get(params, "data.mask_label")),
        min_spacing_mm=float(get(cfg, "min_spacing_mm")),
        max_spacing_mm=float(get(cfg, "max_spacing_mm")),
        hu_min=float(get(cfg, "hu_min")),
        hu_max=float(get(cfg, "hu_max")),
        hu_air_max=float(get(cfg, "hu_air_max")),
        hu_min_range=float(get(cfg, "hu_min_range")),
        grid_tolerance_mm=float(get(cfg, "grid_tolerance_mm")),
        lesion_volume_ml=tuple(get(cfg, "lesion_volume_ml")),
        show_progress=not args.no_progress,
    )
    report_dir = args.report or get(cfg, "report_dir")
    report.write(report_dir)

    for line in report.summary_text().rstrip().splitlines():
        if line.strip():
            log.info("%s", line)
    for case in report.warned_cases:
        rules = ", ".join(f.rule for f in report.failures[case])
        log.warning("case '%s': soft rule(s) broken: %s", case, rules)
    log.info("report written to %s/report.json and report.txt", report_dir)
    if report.passed:
        return 0

    problems = [f"manifest: {f.rule}: {f.detail}" for f in report.hard_manifest_failures]
    for case in report.bad_cases:
        broken = "; ".join(f"{f.rule} ({f.detail})" for f in report.failures[case] if f.severity == "hard")
        problems.append(f"case '{case}': {broken}")
    log.error(
        "cohort %s failed validation (%d bad case(s)):\n  %s",
        args.cohort_dir,
        len(report.bad_cases),
        "\n  ".join(problems),
    )
    return 1
