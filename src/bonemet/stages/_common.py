"""Helpers shared by the entry points: validated params, tracking tags, the MLflow store."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bonemet.config import Params, load_specs

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.registry.store import MlflowTracker

log = logging.getLogger(__name__)


def specs_from(args: Any, segment_profile: str | None = None) -> Params:
    """The validated params file named by ``--params`` (every section checked, not only the stage's)."""
    return load_specs(getattr(args, "params", "params.yaml"), segment_profile=segment_profile)


def git_commit() -> str:
    """The current git commit (with ``-dirty`` when the tree has tracked changes), or 'unknown'."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_md5(data_dvc: str | Path = "data.dvc", lock: str | Path = "dvc.lock") -> str:
    """The md5 DVC recorded for the raw cohort (data.dvc first, then dvc.lock), or 'unknown'."""
    try:
        doc = yaml.safe_load(Path(data_dvc).read_text(encoding="utf-8"))
        return str(doc["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        pass
    try:
        doc = yaml.safe_load(Path(lock).read_text(encoding="utf-8"))
        for stage in doc.get("stages", {}).values():
            for dep in stage.get("deps", []):
                if dep.get("path", "").rstrip("/") == "data/raw":
                    return str(dep["md5"])
    except (OSError, AttributeError, TypeError, yaml.YAMLError):
        pass
    return "unknown"


def run_tags() -> dict[str, str]:
    """Tags put on every MLflow run: git commit, data hash and the DVC experiment name."""
    tags = {"git_commit": git_commit(), "data_md5": data_md5()}
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        tags["dvc_exp"] = exp
    return tags


def open_store(params: Params) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the project's store (``tracking.store_dir``); the URI."""
    from bonemet.registry.store import configure

    return configure(os.environ.get("MLFLOW_TRACKING_URI"), params.tracking.store_dir)


def mlflow_tracker(params: Params, experiment: str) -> MlflowTracker:
    """An MlflowTracker for ``experiment`` on the configured store, with the run tags."""
    from bonemet.registry.store import MlflowTracker

    return MlflowTracker(
        experiment,
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
        store_dir=params.tracking.store_dir,
        default_tags=run_tags(),
    )
