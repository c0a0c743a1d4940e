"""DVC, driven from one place: the ``dvc`` executable, its runs (``dvc add``, ``dvc commit``), the
``.dvc`` files and ``dvc.lock`` it writes, and the environment it gives the stages it runs.

bonemet never imports DVC: it reads DVC's files and runs its command line, here only
(tests/test_layers.py). The stages (``stages._common``: the project's root; ``stages.ensure_data``:
versioning the cohort) and ``tracking.provenance`` (run tags, the cohort's md5) call these functions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import subprocess

log = logging.getLogger(__name__)

#: the lock file ``dvc repro`` writes at the repository root
LOCK_FILE = "dvc.lock"


# --- the environment of a stage DVC runs ---------------------------------------------------------


def dvc_root() -> str | None:
    """The repository root DVC gives the stage it runs (``DVC_ROOT``: the parent repository's root
    for a queued experiment, whose stages run in a temporary copy under ``.dvc/tmp/exps``); None
    outside DVC."""
    return os.environ.get("DVC_ROOT") or None


def project_path(path: str) -> str:
    """``path`` relative to the project's root: :func:`dvc_root` when a stage runs under DVC (a
    queued experiment's stages run in a temporary copy under ``.dvc/tmp/exps``), else the working
    directory. So every experiment, queued or not, tracks to the project's one MLflow store."""
    root = dvc_root()
    if not root or Path(path).is_absolute() or Path(root).resolve() == Path.cwd().resolve():
        return path
    return str(Path(root) / path)


def in_dvc_stage() -> bool:
    """Whether this process is a stage DVC runs (``DVC_STAGE`` set)."""
    return bool(os.environ.get("DVC_STAGE"))


def experiment_name() -> str | None:
    """The DVC experiment the stage runs in (``DVC_EXP_NAME``), or None."""
    return os.environ.get("DVC_EXP_NAME") or None


# --- DVC's files ---------------------------------------------------------------------------------


def _read_yaml(path: Path) -> object:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dvc_file_out(dvc_file: Path) -> tuple[Path, str] | None:
    """``(tracked path relative to the working directory, md5)`` of a one-output .dvc file."""
    import yaml

    try:
        doc = _read_yaml(dvc_file)
        out = doc["outs"][0]  # type: ignore[index]
        return Path(os.path.normpath(dvc_file.parent / str(out["path"]))), str(out.get("md5", ""))
    except (OSError, KeyError, IndexError, TypeError, AttributeError, yaml.YAMLError):
        return None


def cohort_dvc_file(cohort_dir: str | Path) -> Path | None:
    """The .dvc file that versions the cohort folder, or None.

    ``data.dvc`` (at the repository root) tracks the default ``data/raw``; a cohort elsewhere is
    tracked by the ``<cohort_dir>.dvc`` that ``dvc add <cohort_dir>`` writes beside it (also any
    root-level ``*.dvc`` whose output is the folder). Paths are relative to the working
    directory, the repository root where stages run.
    """
    target = Path(os.path.normpath(cohort_dir))
    candidates = [Path(f"{target}.dvc"), *sorted(Path(".").glob("*.dvc"))]
    for candidate in candidates:
        if candidate.is_file():
            out = dvc_file_out(candidate)
            if out is not None and out[0] == target:
                return candidate
    return None


def data_md5(cohort_dir: str | Path, lock: str | Path = LOCK_FILE) -> str:
    """The md5 DVC recorded for the cohort (its .dvc file first, then dvc.lock), or 'unknown'."""
    import yaml

    dvc_file = cohort_dvc_file(cohort_dir)
    out = dvc_file_out(dvc_file) if dvc_file is not None else None
    if out is not None and out[1]:
        return out[1]
    target = os.path.normpath(cohort_dir)
    try:
        doc = _read_yaml(Path(lock))
        for stage in doc.get("stages", {}).values():  # type: ignore[union-attr]
            for dep in stage.get("deps", []):
                if os.path.normpath(dep.get("path", "")) == target:
                    return str(dep["md5"])
    except (OSError, AttributeError, TypeError, yaml.YAMLError):
        pass
    return "unknown"


# --- the dvc command line ------------------------------------------------------------------------


def dvc_executable() -> str:
    """The dvc executable of this environment (beside ``bonemet``), else the one on PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.is_file() else (shutil.which("dvc") or "dvc")


def run_dvc(*args: str) -> subprocess.CompletedProcess[str]:
    """``dvc <args>`` in the working directory (no input; output captured as text)."""
    import subprocess

    return subprocess.run([dvc_executable(), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True)


def version_cohort(cohort_dir: Path, *, regenerated: bool) -> int:
    """Version the cohort folder with DVC; 0, or 1 when DVC refused (see ``bonemet.stages.ensure_data``).

    Tracked already (its .dvc file): a ``regenerated`` cohort is committed to the DVC cache
    (``dvc commit``, which refuses when the files differ from what the .dvc file records). Not
    tracked yet: ``dvc add <cohort_dir>``. Outside the repository, or no DVC repository here: not
    versioned (a warning says how).
    """
    import subprocess

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
        proc = run_dvc("commit", str(dvc_file))
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
    proc = run_dvc("add", str(relative))
    if proc.returncode != 0:
        log.error("`dvc add %s` failed:\n%s", relative, (proc.stderr or proc.stdout).strip()[-2000:])
        return 1
    log.info("cohort %s now versioned by %s: `git add %s %s` to commit it", relative, target, target,
             target.parent / ".gitignore")
    return 0
