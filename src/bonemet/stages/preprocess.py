"""`bonemet preprocess`: resample, normalise and crop every case of the cohort."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort-dir", default=None, help="cohort folder (default: params data.cohort_dir)")
    parser.add_argument("--out", default=None, help="output folder (default: params preprocess.out_dir)")
    parser.add_argument("--n-jobs", type=int, default=None, help="processes, -1 all cores (default: params "
                        "preprocess.n_jobs)")


def run(args: argparse.Namespace) -> int:
    from bonemet.preprocessing import preprocess_cohort
    from bonemet.stages._common import planned_specs_from, pseudonym_key

    params = planned_specs_from(args)
    changes = {k: v for k, v in (("out_dir", args.out), ("n_jobs", args.n_jobs)) if v is not None}
    spec = params.preprocess.updated(changes)
    cohort_dir = args.cohort_dir or params.data.cohort_dir
    table = preprocess_cohort(cohort_dir, spec, compute=params.compute, mask_label=params.data.mask_label,
                              grid_tolerance_mm=params.validation.grid_tolerance_mm,
                              roi=params.data.roi, seg_segment=params.data.segment,
                              pseudonym_key=pseudonym_key(params), show_progress=not args.no_progress)
    log.info("preprocessed %d cases into %s", len(table), spec.out_dir)
    return 0
