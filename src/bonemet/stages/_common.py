"""Helpers shared by the entry points: params, tracking tags, the MLflow tracker."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from bonemet.config import load_params

log = logging.getLogger(__name__)


def params_from(args: Any) -> dict[str, Any]:
    """Load the params file named by ``--params``."""
    return load_params(getattr(args, "params", "params.yaml"))


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


def mlflow_tracker(experiment: str, store_dir: str = "mlruns"):
    """An MlflowTracker for ``experiment`` with the run tags; honours MLFLOW_TRACKING_URI."""
    from bonemet.tracking.mlflow_backend import MlflowTracker

    return MlflowTracker(
        experiment,
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
        store_dir=store_dir,
        default_tags=run_tags(),
    )


def radiomics_settings(params: dict[str, Any]) -> dict[str, Any]:
    """PyRadiomics settings as the extract stage builds them (settings file + ``radiomics`` params)."""
    from bonemet.config import get, section
    from bonemet.radiomics import build_settings, load_settings_file

    cfg = section(params, "radiomics")
    return build_settings(
        load_settings_file(get(cfg, "settings_file")),
        bin_width=get(cfg, "bin_width"),
        resampled_spacing_mm=get(cfg, "resampled_spacing_mm"),
        interpolator=get(cfg, "interpolator"),
        normalize=get(cfg, "normalize"),
        label=get(cfg, "label"),
    )
