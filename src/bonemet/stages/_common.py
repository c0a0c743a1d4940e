"""Helpers shared by the entry points: validated params, the cohort's cases, the MLflow store."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bonemet.config import Params, PlannedParams, load_specs
from bonemet.tracking.dvc import project_path

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

    from bonemet.registry.store import MlflowTracker
    from bonemet.tracking import DatasetInput


def specs_from(args: Any, segment_profile: str | None = None) -> Params:
    """The validated params file named by ``--params`` (every section checked, not only the stage's),
    with the MLflow store at :func:`~bonemet.tracking.dvc.project_path` (one store per project)."""
    params = load_specs(getattr(args, "params", "params.yaml"), segment_profile=segment_profile)
    store_dir = project_path(params.tracking.store_dir)
    if store_dir == params.tracking.store_dir:
        return params
    return params.model_copy(update={"tracking": params.tracking.updated({"store_dir": store_dir})})


def planned_specs_from(args: Any, segment_profile: str | None = None) -> PlannedParams:
    """:func:`specs_from` with the plan applied (:func:`bonemet.planning.resolve.planned_params`)."""
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

    return read_manifest(cohort_dir or params.data.cohort_dir, roi=params.data.roi, seg_segment=params.data.segment,
                         pseudonym_key=pseudonym_key(params))


def cohort_input(params: Params) -> DatasetInput:
    """The cohort as the MLflow training dataset of a run (:func:`bonemet.tracking.provenance.cohort_dataset`)."""
    from bonemet.tracking.provenance import cohort_dataset

    return cohort_dataset(read_cases(params), params.data.cohort_dir, "training")


def open_store(params: Params) -> MlflowClient:
    """The client of ``MLFLOW_TRACKING_URI`` or the project's store (:func:`bonemet.registry.store.project_store`)."""
    from bonemet.registry.store import project_store

    return project_store(params.tracking, os.environ.get("MLFLOW_TRACKING_URI"))


def mlflow_tracker(params: Params, experiment: str, *, inputs: Sequence[DatasetInput] = (),
                   long_running: bool = False, tags: dict[str, str] | None = None) -> MlflowTracker:
    """The stage's tracker for ``experiment`` (:meth:`bonemet.registry.store.MlflowTracker.for_stage`)
    with the run's provenance tags (:func:`bonemet.tracking.provenance.run_tags`) and ``tags``."""
    from bonemet.registry.store import MlflowTracker
    from bonemet.tracking.provenance import run_tags

    return MlflowTracker.for_stage(params.tracking, experiment, tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
                                   default_tags={**run_tags(params.data.cohort_dir), **(tags or {})},
                                   inputs=inputs, long_running=long_running)
