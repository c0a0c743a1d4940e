"""`bonemet extract`: PyRadiomics features from the manual, automatic and annotator masks."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort-dir", default=None, help="cohort folder (default: params data.cohort_dir)")
    parser.add_argument("--auto-masks", default=None,
                        help="automatic masks folder (default: params segment.masks_dir, the segment stage's output)")
    parser.add_argument("--out", default=None, help="output folder for the feature tables (default: params "
                        "radiomics.out_dir)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    from bonemet.radiomics import extract_sources, settings_from_params
    from bonemet.stages._common import cohort_input, mlflow_tracker, read_cases, specs_from
    from bonemet.tracking.base import NullTracker

    params = specs_from(args)
    spec = params.radiomics
    cohort = args.cohort_dir or params.data.cohort_dir
    settings = settings_from_params(params)
    cases = read_cases(params, cohort)
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(params, spec.experiment, long_running=True,
                                                                    inputs=[cohort_input(params)])
    summary = extract_sources(
        cases,
        settings,
        args.out or params.radiomics.out_dir,
        sources=list(spec.sources),
        auto_masks_dir=args.auto_masks or params.segment.masks_dir,
        n_jobs=spec.n_jobs,
        compute=params.compute,
        cache_dir=spec.cache_dir,
        allow_drop=spec.allow_drop,
        grid_tolerance_mm=params.validation.grid_tolerance_mm,
        tracker=tracker,
        show_progress=not args.no_progress,
        log_params={"radiomics": spec.model_dump(mode="json"), "mask_label": params.data.mask_label,
                    "cohort": str(cohort)},
    )
    sys.stdout.write(json.dumps(summary["sources"], sort_keys=True) + "\n")
    return 0
