"""`bonemet split`: stratified train/test split and cross-validation folds (grouped by the manifest's
patient_id when it has one)."""

from __future__ import annotations

import argparse
import logging
from collections import Counter

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort-dir", default=None, help="cohort folder (default: params data.cohort_dir)")
    parser.add_argument("--out", default=None, help="splits JSON (default: params split.out)")


def run(args: argparse.Namespace) -> int:
    from bonemet.splits import make_splits, write_splits
    from bonemet.stages._common import read_cases, specs_from

    params = specs_from(args)
    cases = read_cases(params, args.cohort_dir)
    out = args.out or params.split.out
    grouped = any(c.patient_id is not None for c in cases)
    splits = make_splits(
        [c.case_id for c in cases],
        [c.label for c in cases],
        test_size=params.split.test_size,
        n_folds=params.split.n_folds,
        seed=params.seed,
        groups=[c.patient for c in cases] if grouped else None,
    )
    write_splits(out, splits)
    label_of = {c.case_id: c.label for c in cases}
    log.info(
        "wrote %s: train %d %s, test %d %s, %d folds",
        out,
        len(splits["train"]),
        dict(sorted(Counter(label_of[c] for c in splits["train"]).items())),
        len(splits["test"]),
        dict(sorted(Counter(label_of[c] for c in splits["test"]).items())),
        splits["n_folds"],
    )
    if grouped:
        log.info("splits grouped by patient: %d patients for %d cases", len({c.patient for c in cases}), len(cases))
    return 0
