"""`bonemet validate [COHORT_DIR | --cohort-dir DIR] [--out DIR]`: check a cohort before anything uses it.

Logs the readable report and exits 1 when a hard rule failed, naming every bad case and the
rules it broke; soft rules only warn. With ``--out DIR`` (or ``--report DIR``) it also writes ``report.json`` and
``report.txt`` there (even when the cohort fails, so they can be read); without it nothing is
written, so checking another folder never touches the pipeline's ``data/validation``. The
cohort folder is only read.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cohort", nargs="?", default=None, metavar="COHORT_DIR",
                        help="cohort folder holding manifest.csv, images and masks (same as --cohort-dir)")
    parser.add_argument("--cohort-dir", default=None,
                        help="cohort folder (default: the positional COHORT_DIR, else params data.cohort_dir)")
    parser.add_argument(
        "--out", "--report",
        dest="report",
        default=None,
        metavar="DIR",
        help="also write report.json and report.txt into DIR (default: write nothing)",
    )


def run(args: argparse.Namespace) -> int:
    from bonemet.stages._common import pseudonym_key, specs_from
    from bonemet.validation.cohort import validate_cohort

    params = specs_from(args)
    args.cohort_dir = args.cohort_dir or args.cohort or params.data.cohort_dir
    report = validate_cohort(args.cohort_dir, params.validation, mask_label=params.data.mask_label,
                             roi=params.data.roi, seg_segment=params.data.segment,
                             pseudonym_key=pseudonym_key(params), show_progress=not args.no_progress)
    if args.report:
        report.write(args.report)

    for line in report.summary_text().rstrip().splitlines():
        if line.strip():
            log.info("%s", line)
    for case in report.warned_cases:
        rules = ", ".join(f.rule for f in report.failures[case])
        log.warning("case '%s': soft rule(s) broken: %s", case, rules)
    if args.report:
        log.info("report written to %s/report.json and report.txt", args.report)
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
