"""Helpers shared by the entry points: validated params, tracking tags, the MLflow store."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonemet.config import Params, load_specs
from bonemet.tracking.dvc import cohort_dvc_file, data_md5, dvc_root, experiment_name  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

    from bonemet.registry.store import MlflowTracker
    from bonemet.tracking import DatasetInput

log = logging.getLogger(__name__)


def specs_from(args: Any, segment_profile: str | None = None) -> Params:
    """The validated params file named by ``--params`` (every section checked, not only the stage's),
    with the MLflow store at :func:`project_path` (one store per project, whatever the workspace)."""
    params = load_specs(getattr(args, "params", "params.yaml"), segment_profile=segment_profile)
    store_dir = project_path(params.tracking.store_dir)
    if store_dir == params.tracking.store_dir:
        return params
    return params.model_copy(update={"tracking": params.tracking.updated({"store_dir": store_dir})})


def project_path(path: str) -> str:
    """``path`` relative to the project's root: DVC's ``DVC_ROOT`` when a stage runs under DVC (the
    parent repository's root for a queued experiment, whose stages run in a temporary copy under
    ``.dvc/tmp/exps``), else the working directory. So every experiment, queued or not, tracks to
    the project's one MLflow store."""
    root = dvc_root()
    if not root or Path(path).is_absolute() or Path(root).resolve() == Path.cwd().resolve():
        return path
    return str(Path(root) / path)


def planned_specs_from(args: Any, segment_profile: str | None = None) -> Params:
    """:func:`specs_from` with every ``auto`` setting taken from the plan file (``plan.out``; explicit
    values win). Raises a user error when the plan is missing or was made from other params."""
    from bonemet.planning.resolve import planned_params

    return planned_params(specs_from(args, segment_profile=segment_profile))


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


def run_tags(cohort_dir: str | Path) -> dict[str, str]:
    """Tags put on every MLflow run: git commit, the cohort's data hash and the DVC experiment name."""
    tags = {"git_commit": git_commit(), "data_md5": data_md5(cohort_dir)}
    exp = experiment_name()
    if exp:
        tags["dvc_exp"] = exp
    return tags


def pseudonym_key(params: Params) -> bytes | None:
    """The pseudonymisation key from the environment variable ``data.pseudonym_key_env`` when
    ``data.pseudonymize`` is on (None when off).

    Raises:
        PseudonymKeyError: pseudonymisation is on and the variable is unset or too short.
    """
    from bonemet.data.pseudonym import PseudonymKeyError, check_key

    if not params.data.pseudonymize:
        return None
    name = params.data.pseudonym_key_env
    value = os.environ.get(name)
    if not value:
        raise PseudonymKeyError(
            f"data.pseudonymize is on but ${name} is not set: export the cohort's key (the same one every "
            f"stage and `bonemet pseudonyms` use), e.g. `export {name}=$(openssl rand -hex 32)` once, kept "
            "outside the repository"
        )
    return check_key(value.encode("utf-8"), f"${name}")


def read_cases(params: Params, cohort_dir: str | None = None) -> list:
    """The cohort's cases (``data.cohort_dir`` unless given) with the params' ROI / segment defaults
    and, when on, pseudonymous ids."""
    from bonemet.data.manifest import read_manifest

    return read_manifest(cohort_dir or params.data.cohort_dir, roi=params.data.roi, segment=params.data.segment,
                         pseudonym_key=pseudonym_key(params))


def _http_settings(params: Params) -> None:
    """MLflow's request retries and timeout from ``tracking`` (the user's environment wins)."""
    tracking = params.tracking
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(tracking.http_max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(tracking.http_backoff_factor))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(tracking.http_timeout_s))


def open_store(params: Params) -> MlflowClient:
    """The client of ``MLFLOW_TRACKING_URI`` or the project's store (``tracking.store_dir``), created
    if needed; its ``tracking_uri`` is the URI. MLflow's global URIs are left alone."""
    from bonemet.registry.store import client

    _http_settings(params)
    return client(os.environ.get("MLFLOW_TRACKING_URI"), params.tracking.store_dir)


def cohort_input(params: Params, context: str = "training") -> DatasetInput:
    """The cohort as an MLflow dataset: one row per case (id, label, patient and site when the
    manifest has them; pseudonymous ids when ``data.pseudonymize``; no file paths, which may carry
    ids), its DVC md5 as the digest, its case count."""
    import pandas as pd

    from bonemet.data.manifest import MANIFEST_NAME
    from bonemet.tracking import DatasetInput

    cases = read_cases(params)
    table = pd.DataFrame({"case_id": [c.case_id for c in cases], "label": [int(c.label) for c in cases]})
    if any(c.patient_id for c in cases):
        table["patient_id"] = [c.patient_id or "" for c in cases]
    if any(c.site for c in cases):
        table["site"] = [c.site or "" for c in cases]
    digest = data_md5(params.data.cohort_dir)
    return DatasetInput(name="cohort", table=table, source=str(Path(params.data.cohort_dir) / MANIFEST_NAME),
                        digest=digest, context=context,
                        tags={"dvc_md5": digest, "n_cases": str(len(table)), "cohort_dir": str(params.data.cohort_dir)})


def feature_inputs(features_dir: str | Path, sources: Sequence[str], context: str = "training") -> list[DatasetInput]:
    """The feature tables (``<source>.parquet``) that exist, as MLflow datasets (digest: the file's md5)."""
    import pandas as pd

    from bonemet.tracking import DatasetInput
    from bonemet.utils import file_md5

    out = []
    for source in sources:
        path = Path(features_dir) / f"{source}.parquet"
        if path.is_file():
            table = pd.read_parquet(path)
            out.append(DatasetInput(name=f"features-{source}", table=table, source=str(path), digest=file_md5(path),
                                    context=context, tags={"n_cases": str(len(table)), "mask_source": source,
                                                           "n_columns": str(table.shape[1])}))
    return out


def segmentation_bias_tags(params: Params) -> dict[str, str]:
    """The segmentation's Dice gap between the labels (label 1 minus label 0, ``metrics/segmentation.json``
    ``bias``) as run tags, for the stages whose models learn from automatic-mask features: a reader
    sees beside each model and the registry's decision when those features may carry the
    segmenter's class-dependent error. Empty when unknown."""
    import json

    try:
        bias = json.loads(Path(params.segment.metrics).read_text(encoding="utf-8")).get("bias") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    gap = bias.get("label_dice_gap")
    if gap is None:
        return {}
    limit = params.segment.bias.max_dice_gap
    return {"segmentation_label_dice_gap": f"{float(gap):+.4f}",
            "segmentation_bias": "over segment.bias.max_dice_gap" if abs(float(gap)) > limit else "within limit"}


def mlflow_tracker(params: Params, experiment: str, *, inputs: Sequence[DatasetInput] = (),
                   long_running: bool = False, tags: dict[str, str] | None = None) -> MlflowTracker:
    """An MlflowTracker for ``experiment`` on the configured store, with the run tags; ``inputs`` are
    logged on every run it opens; a ``long_running`` stage gets system metrics when
    ``tracking.system_metrics`` is on."""
    from bonemet.registry.store import MlflowTracker

    _http_settings(params)
    return MlflowTracker(
        experiment,
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
        store_dir=params.tracking.store_dir,
        default_tags={**run_tags(params.data.cohort_dir), **(tags or {})},
        inputs=inputs,
        system_metrics=long_running and params.tracking.system_metrics,
        system_metrics_interval_s=params.tracking.system_metrics_interval_s,
    )
