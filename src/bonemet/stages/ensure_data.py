"""`bonemet ensure-data`: make sure the raw cohort folder exists, and is versioned, before `dvc repro`.

* ``data.source: synthetic`` and no ``manifest.csv`` in ``data.cohort_dir``: generate the default
  synthetic cohort there from ``data.synthetic`` (into a temporary folder, then renamed), so a
  fresh clone reproduces the exact files that ``data.dvc`` records.
* ``data.source: user`` and no cohort: exit 1 telling the user where to put it.
* A cohort already there: nothing to generate.

Then the cohort is versioned by DVC (``make run`` runs this before ``dvc repro``), wherever
``data.cohort_dir`` points inside the repository:

* tracked already (``data.dvc`` for ``data/raw``, ``<cohort_dir>.dvc`` for a folder elsewhere):
  a freshly generated cohort is committed to the DVC cache (``dvc commit``, which refuses when
  the regenerated files differ from what the .dvc file records: the cohort is byte-identical or
  the run stops);
* not tracked yet: ``dvc add <cohort_dir>`` writes ``<cohort_dir>.dvc`` (and a .gitignore entry)
  for the user to commit with git;
* outside the repository, or no DVC repository here: not versioned (a warning says how); the
  stages still depend on the folder, so dvc.lock records its hash.

The versioning runs DVC from its one home, :func:`bonemet.tracking.dvc.version_cohort`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """No options of its own (``--params`` and ``--no-progress`` are every command's)."""


def run(args: argparse.Namespace) -> int:
    from bonemet.data.manifest import MANIFEST_NAME
    from bonemet.stages._common import specs_from
    from bonemet.tracking.dvc import version_cohort

    params = specs_from(args)
    cohort_dir = Path(params.data.cohort_dir)
    source = params.data.source
    manifest = cohort_dir / MANIFEST_NAME
    if manifest.is_file():
        log.info("cohort present: %s (source: %s); nothing to generate", cohort_dir, source)
        return version_cohort(cohort_dir, regenerated=False)
    if source == "user":
        log.error(
            "%s not found. data.source is 'user': put your cohort in %s (manifest.csv with columns "
            "case_id,label,image,mask plus images and masks, see README 'Bring your own data'), "
            "or fetch the versioned cohort with `dvc pull`",
            manifest,
            cohort_dir,
        )
        return 1
    if cohort_dir.exists() and (not cohort_dir.is_dir() or any(cohort_dir.iterdir())):
        log.error(
            "%s exists without %s; not overwriting it. Remove it to regenerate the synthetic cohort, "
            "or `dvc checkout data.dvc` / `dvc pull` to restore the versioned one",
            cohort_dir,
            MANIFEST_NAME,
        )
        return 1

    from bonemet.data.synthetic import write_cohort

    synth = params.data.synthetic
    log.info("no cohort in %s: generating the default synthetic cohort (seed %s)", cohort_dir, synth.seed)
    summary = write_cohort(cohort_dir, n_cases=synth.n_cases, n_positive=synth.n_positive, seed=synth.seed,
                           size=synth.size, mask_label=params.data.mask_label, protocols=synth.protocols[: synth.sites],
                           show_progress=not args.no_progress)
    log.info("wrote %d cases to %s (Bayes AUC %.3f)", summary["n_cases"], cohort_dir, summary["bayes_auc"])
    return version_cohort(cohort_dir, regenerated=True)
