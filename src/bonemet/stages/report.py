"""`bonemet report`: the self-contained HTML report of the last pipeline run."""

from __future__ import annotations

import argparse

from bonemet.stages._common import data_md5, git_commit, params_from


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="HTML file (default: params report.out)")


def run(args: argparse.Namespace) -> int:
    from bonemet.config import section
    from bonemet.report import build_report

    params = section(params_from(args), "report")
    build_report(
        args.out or params["out"],
        metrics_dir=params["metrics_dir"],
        plot_dirs=params["plot_dirs"],
        title=params.get("title", "bonemet pipeline report"),
        extra_sections=[(heading, path) for heading, path in params.get("extra_sections", {}).items()],
        context={"git commit": git_commit(), "data md5": data_md5()},
    )
    return 0
