"""Helpers shared by the entry points: validated params, tracking tags, the MLflow store."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonemet.config import Params, PlannedParams, load_specs
from bonemet.tracking.dvc import dvc_root
from bonemet.tracking.provenance import run_tags

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


def planned_specs_from(args: Any, segment_profile: str | None = None) -> PlannedParams:
    """:func:`specs_from` with the plan applied: every ``auto`` setting taken from the plan file
    (``plan.out``; explicit values win), for the stages after the plan stage that use planned
    settings. Raises a user error when the plan is missing or was made from other params."""
    from bonemet.planning.resolve import planned_params

    return planned_params(specs_from(args, segment_profile=segment_profile))


def pseudonym_key(params: Params) -> bytes | None:
    """The pseudonymisation key (:func:`bonemet.data.pseudonym.key_from_environment`) when
    ``data.pseudonymize`` is on, from the variable ``data.pseudonym_key_env``; None when off."""
    from bonemet.data.pseudonym import key_from_environment

    return key_from_environment(params.data.pseudonym_key_env) if params.data.pseudonymize else None


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


def cohort_input(params: Params) -> DatasetInput:
    """The cohort as the MLflow training dataset of a run (:func:`bonemet.tracking.provenance.cohort_dataset`)."""
    from bonemet.data.manifest import MANIFEST_NAME
    from bonemet.tracking.provenance import cohort_dataset

    return cohort_dataset(read_cases(params), params.data.cohort_dir, MANIFEST_NAME, "training")


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
