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

    from bonemet.data.synthetic import generate_cohort
    from bonemet.utils import atomic_path

    synth = params.data.synthetic
    log.info("no cohort in %s: generating the default synthetic cohort (seed %s)", cohort_dir, synth.seed)
    with atomic_path(cohort_dir, is_dir=True) as tmp:
        summary = generate_cohort(
            tmp,
            n_cases=synth.n_cases,
            n_positive=synth.n_positive,
            seed=synth.seed,
            size=synth.size,
            mask_label=params.data.mask_label,
            protocols=synth.protocols[: synth.sites],
            overwrite=True,
            show_progress=not args.no_progress,
        )
    log.info("wrote %d cases to %s (Bayes AUC %.3f)", summary["n_cases"], cohort_dir, summary["bayes_auc"])
    return version_cohort(cohort_dir, regenerated=True)


def _dvc() -> str:
    """The dvc executable of this environment (beside ``bonemet``), else the one on PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.is_file() else (shutil.which("dvc") or "dvc")


def version_cohort(cohort_dir: Path, *, regenerated: bool) -> int:
    """Version the cohort folder with DVC (see the module docstring); 0, or 1 when DVC refused."""
    import subprocess

    from bonemet.stages._common import cohort_dvc_file

    if not Path(".dvc").is_dir():
        log.warning("no DVC repository in %s: the cohort %s is not versioned (run from the repository root)",
                    Path.cwd(), cohort_dir)
        return 0
    try:
        relative = cohort_dir.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        log.warning(
            "%s is outside the repository: DVC cannot version it (the stages still record its hash in "
            "dvc.lock). To version it, copy it in: `dvc add %s -o cohorts/%s` and set data.cohort_dir to "
            "cohorts/%s", cohort_dir, cohort_dir, cohort_dir.name, cohort_dir.name)
        return 0
    dvc_file = cohort_dvc_file(relative)
    if dvc_file is not None:
        if not regenerated:
            log.info("cohort %s versioned by %s", relative, dvc_file)
            return 0
        proc = subprocess.run([_dvc(), "commit", str(dvc_file)], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            log.error("`dvc commit %s` failed: the regenerated cohort differs from what %s records?\n%s",
                      dvc_file, dvc_file, (proc.stderr or proc.stdout).strip()[-2000:])
            return 1
        log.info("regenerated cohort %s matches %s; committed to the DVC cache", relative, dvc_file)
        return 0
    target = Path(f"{relative}.dvc")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(target)], capture_output=True)
    if ignored.returncode == 0:
        log.error(
            "%s would be ignored by git (.gitignore), so DVC refuses to version %s there; put the cohort in a "
            "folder git does not ignore, e.g. cohorts/%s, and set data.cohort_dir to it", target, relative,
            relative.name)
        return 1
    proc = subprocess.run([_dvc(), "add", str(relative)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        log.error("`dvc add %s` failed:\n%s", relative, (proc.stderr or proc.stdout).strip()[-2000:])
        return 1
    log.info("cohort %s now versioned by %s: `git add %s %s` to commit it", relative, target, target,
             target.parent / ".gitignore")
    return 0
