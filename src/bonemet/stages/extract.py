"""`bonemet extract`: PyRadiomics features from the manual, automatic and annotator masks."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", default=None, help="cohort folder (default: params data.cohort_dir)")
    parser.add_argument("--auto-masks", default="data/auto_masks", help="automatic masks folder (segment stage output)")
    parser.add_argument("--out", default="data/features", help="output folder for the feature tables")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from bonemet.config import get, section
    from bonemet.data.manifest import read_manifest
    from bonemet.radiomics import extract_sources
    from bonemet.stages._common import mlflow_tracker, params_from, radiomics_settings
    from bonemet.tracking.base import NullTracker

    params = params_from(args)
    cfg = section(params, "radiomics")
    cohort = args.cohort or get(params, "data.cohort_dir")
    settings = radiomics_settings(params)
    cases = read_manifest(cohort)
    tracker = NullTracker() if args.no_tracking else mlflow_tracker("bonemet-radiomics")
    try:
        summary = extract_sources(
            cases,
            settings,
            args.out,
            sources=list(get(cfg, "sources")),
            auto_masks_dir=args.auto_masks,
            n_jobs=int(get(cfg, "n_jobs")),
            cache_dir=get(cfg, "cache_dir"),
            allow_drop=bool(get(cfg, "allow_drop")),
            tracker=tracker,
            show_progress=not args.no_progress,
            log_params={f"radiomics.{k}": v for k, v in cfg.items()} | {"cohort": str(cohort)},
        )
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.write(json.dumps(summary["sources"], sort_keys=True) + "\n")
    return 0
