"""`bonemet report`: the self-contained HTML report of the last pipeline run."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="HTML file (default: params report.out)")


def run(args: argparse.Namespace) -> int:
    from bonemet.report import build_report
    from bonemet.stages._common import data_md5, git_commit, specs_from

    params = specs_from(args)
    spec = params.report
    build_report(
        args.out or spec.out,
        metrics_dir=spec.metrics_dir,
        plot_dirs=spec.plot_dirs,
        title=spec.title,
        extra_sections=list(spec.extra_sections.items()),
        context={"git commit": git_commit(), "data md5": data_md5(params.data.cohort_dir)},
    )
    return 0
