"""`bonemet synth OUT`: write a synthetic spine-CT cohort in the bring-your-own format.

Defaults come from params ``data.synthetic`` (n_cases, n_positive, seed, size, sites and the
site protocols) and ``data.mask_label``; explicit arguments override them. ``--sites 2`` writes a
two-site cohort (a ``site`` column; the second site scanned with ``data.synthetic.protocols[1]``).
The cohort is written into a temporary sibling folder and renamed onto OUT, so OUT is never left
half-written. Prints the cohort summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output cohort folder (must be missing or empty unless --force)")
    parser.add_argument("--n", type=int, default=None, help="number of cases (default: params data.synthetic.n_cases)")
    parser.add_argument("--n-positive", type=int, default=None,
                        help="label-1 cases (default: params data.synthetic.n_positive, scaled to --n when --n is given)")
    parser.add_argument("--seed", type=int, default=None, help="cohort seed (default: params data.synthetic.seed)")
    parser.add_argument("--small", action="store_true",
                        help="tiny volumes (~32^3 voxels, coarse spacing) for tests (default: params data.synthetic.size)")
    parser.add_argument("--sites", type=int, default=None,
                        help="acquisition sites, each with its protocol from params data.synthetic.protocols "
                             "(default: params data.synthetic.sites)")
    parser.add_argument("--figure", default=None, metavar="PATH", help="also write a PNG of a few cases to PATH")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args: argparse.Namespace) -> int:
    from bonemet.data.synthetic import case_counts, plot_cases, write_cohort
    from bonemet.stages._common import specs_from

    params = specs_from(args)
    synth = params.data.synthetic
    n_cases, n_positive = case_counts(args.n, args.n_positive, synth.n_cases, synth.n_positive)
    seed = synth.seed if args.seed is None else args.seed
    mask_label = params.data.mask_label
    sites = synth.sites if args.sites is None else args.sites
    if not 1 <= sites <= len(synth.protocols):
        log.error("--sites %d: params data.synthetic.protocols describes %d site(s); give 1..%d or add "
                  "protocols there", sites, len(synth.protocols), len(synth.protocols))
        return 1
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        log.error("%s: exists and is not empty; pass --force to replace it", out)
        return 1
    summary = write_cohort(out, n_cases=n_cases, n_positive=n_positive, seed=seed,
                           size="small" if args.small else synth.size, mask_label=mask_label,
                           protocols=synth.protocols[:sites], show_progress=not args.no_progress)
    log.info("wrote %d cases (%d positive, seed %d, %d site(s)) to %s; Bayes AUC %.3f", n_cases, n_positive, seed,
             sites, out, summary["bayes_auc"])
    if args.figure:
        plot_cases(out, None, args.figure, mask_label=mask_label,
                   grid_tolerance_mm=params.validation.grid_tolerance_mm)
    print(json.dumps({"out": str(out), **summary}, indent=2, sort_keys=True))
    return 0
