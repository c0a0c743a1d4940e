"""`bonemet preprocess`: resample, normalise and crop every case of the cohort."""

from __future__ import annotations

import argparse
import logging

from bonemet.config import get
from bonemet.stages._common import params_from

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort-dir", default=None, help="cohort folder (default: params data.cohort_dir)")
    parser.add_argument("--out-dir", default=None, help="output folder (default: params preprocess.out_dir)")
    parser.add_argument("--n-jobs", type=int, default=None, help="processes, -1 all cores (default: params)")


def run(args: argparse.Namespace) -> int:
    from bonemet.preprocessing import preprocess_cohort

    params = params_from(args)
    cohort_dir = args.cohort_dir or get(params, "data.cohort_dir")
    out_dir = args.out_dir or get(params, "preprocess.out_dir")
    table = preprocess_cohort(
        cohort_dir,
        out_dir,
        mask_label=int(get(params, "data.mask_label")),
        target_spacing_mm=get(params, "preprocess.target_spacing_mm"),
        image_interpolator=get(params, "preprocess.image_interpolator"),
        mask_interpolator=get(params, "preprocess.mask_interpolator"),
        hu_window=get(params, "preprocess.hu_window"),
        bone_threshold_hu=get(params, "preprocess.crop.bone_threshold_hu"),
        margin_mm=get(params, "preprocess.crop.margin_mm"),
        min_size_vox=get(params, "preprocess.crop.min_size_vox"),
        min_component_ml=get(params, "preprocess.crop.min_component_ml"),
        n_jobs=args.n_jobs if args.n_jobs is not None else int(get(params, "preprocess.n_jobs")),
    )
    log.info("preprocessed %d cases into %s", len(table), out_dir)
    return 0
