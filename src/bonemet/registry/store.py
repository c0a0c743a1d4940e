"""The MLflow store: configuration, the tracker, versions and aliases.

The project's store: ``sqlite:///<tracking.store_dir>/mlflow.db`` with artifacts under
``<tracking.store_dir>/artifacts``; ``MLFLOW_TRACKING_URI`` (read by the entry point, passed in
here) points at a team server instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from bonemet.tracking.base import DatasetInput, Tracker

log = logging.getLogger(__name__)

def default_tracking_uri(store_dir: str | Path) -> str:
    """SQLite backend inside ``store_dir`` (absolute, so it works from any working directory)."""
    return f"sqlite:///{(Path(store_dir) / 'mlflow.db').resolve()}"


def configure(tracking_uri: str | None, store_dir: str | Path) -> str:
    """Point MLflow at ``tracking_uri`` (or the local SQLite store); returns the URI used."""
    uri = tracking_uri or default_tracking_uri(store_dir)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


#: The MLflow UI (3.x) opens an experiment on its runs, not on its GenAI overview, with this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(name: str, store_dir: str | Path) -> str:
    """The experiment's id, created if needed (artifacts under ``store_dir/artifacts`` for a local
    store) and tagged as a model-training experiment so that the UI opens on its runs."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    artifact_location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        artifact_location = (Path(store_dir) / "artifacts" / name).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:6000]
    return flat


class MlflowTracker(Tracker):
    """Tracker writing to MLflow; runs opened inside another run are nested."""

    def __init__(
        self,
        experiment: str,
        *,
        tracking_uri: str | None,
        store_dir: str | Path,
        default_tags: Mapping[str, str] | None = None,
        inputs: Sequence[DatasetInput] = (),
        system_metrics: bool = False,
        system_metrics_interval_s: float | None = None,
    ) -> None:
        """``inputs``: datasets logged on every run this tracker opens (parent and nested), so the
        UI's Dataset column says which data each run saw. ``system_metrics``: CPU, memory (and
        GPU) use sampled every ``system_metrics_interval_s`` seconds on the top-level runs."""
        self.tracking_uri = configure(tracking_uri, store_dir)
        self.experiment_id = ensure_experiment(experiment, store_dir)
        self.default_tags = {k: str(v) for k, v in (default_tags or {}).items()}
        self.inputs = tuple(inputs)
        self.system_metrics = system_metrics
        if system_metrics and system_metrics_interval_s is not None:
            mlflow.system_metrics.set_system_metrics_sampling_interval(system_metrics_interval_s)

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False) -> Iterator[str]:
        nested = nested or mlflow.active_run() is not None
        all_tags = {**self.default_tags, **{k: str(v) for k, v in (tags or {}).items()}}
        with mlflow.start_run(
            run_name=name, experiment_id=self.experiment_id, nested=nested, tags=all_tags,
            log_system_metrics=self.system_metrics and not nested,
        ) as active:
            for dataset in self.inputs:
                self.log_input(dataset)
            yield active.info.run_id
            if not nested:
                self._log_stage_log()

    def _log_stage_log(self) -> None:
        """The stage's log (its lines and warnings in full), and the warning count, on the top-level run."""
        from bonemet.utils import active_warnings_log, warning_counts

        path = active_warnings_log()
        if path is None or not path.is_file():
            return
        mlflow.log_metric("warnings", float(sum(warning_counts(path).values())))
        if path.stat().st_size:
            mlflow.log_artifact(str(path), artifact_path="logs")

    def log_input(self, dataset: DatasetInput) -> None:
        import mlflow.data
        from mlflow.data.dataset_source_registry import get_registered_sources

        # a local file's source, named explicitly: resolving a path string matches two registered
        # local sources and warns on every run
        local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
        with warnings.catch_warnings():
            # the schema's hint on integer columns is about a model's inputs at inference, not a dataset record
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
            data = mlflow.data.from_pandas(dataset.table, source=local(Path(dataset.source).resolve().as_uri()),
                                           name=dataset.name, digest=dataset.digest[:36])
            mlflow.log_input(data, context=dataset.context, tags={k: str(v) for k, v in dataset.tags.items()})

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow.log_params(_flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        mlflow.log_figure(figure, name)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        mlflow.log_dict(dict(data), name)

    def log_table(self, table: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            if name.endswith(".csv"):
                table.to_csv(path, index=False)
            else:
                table.to_json(path, orient="records", indent=1)
            parent = str(Path(name).parent) if Path(name).parent != Path(".") else None
            mlflow.log_artifact(str(path), artifact_path=parent)

    def log_model(self, model: Any, name: str, **kwargs: Any) -> Any:
        """Log a model. ``flavor`` in kwargs: 'sklearn' (default), 'pytorch' or 'pyfunc'."""
        flavor = kwargs.pop("flavor", "sklearn")
        module = {"sklearn": mlflow.sklearn, "pytorch": mlflow.pytorch, "pyfunc": mlflow.pyfunc}[flavor]
        if flavor == "pyfunc":
            return module.log_model(name=name, python_model=model, **kwargs)
        return module.log_model(model, name=name, **kwargs)


def client(tracking_uri: str | None, store_dir: str | Path) -> MlflowClient:
    """An MlflowClient on the configured store."""
    uri = configure(tracking_uri, store_dir)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --- model registry -------------------------------------------------------------------------
# Aliases (`staging`, `production`), never the deprecated stages.


def register_model(
    run_id: str,
    artifact_path: str,
    name: str,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name``; returns the version."""
    mv = mlflow.register_model(f"runs:/{run_id}/{artifact_path}", name, tags={k: str(v) for k, v in (tags or {}).items()})
    if description:
        MlflowClient().update_model_version(name, mv.version, description=description)
    log.info("registered %s version %s from run %s", name, mv.version, run_id)
    return str(mv.version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    """Point ``name@alias`` at ``version``."""
    MlflowClient().set_registered_model_alias(name, alias, str(version))
    log.info("%s@%s -> version %s", name, alias, version)


def alias_version(name: str, alias: str) -> str | None:
    """The version ``name@alias`` points at, or None when the model or alias does not exist."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def model_versions(name: str) -> list[dict[str, Any]]:
    """Every version of ``name``: version, aliases, run id, tags, description, creation time."""
    try:
        found = MlflowClient().search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return []
    # search results do not carry aliases: read them from the registered model.
    try:
        by_version: dict[str, list[str]] = {}
        for alias, version in (MlflowClient().get_registered_model(name).aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
    except mlflow.exceptions.MlflowException:
        by_version = {}
    rows = [
        {
            "version": str(mv.version),
            "aliases": sorted(set(mv.aliases or []) | set(by_version.get(str(mv.version), []))),
            "run_id": mv.run_id,
            "tags": dict(mv.tags or {}),
            "description": mv.description or "",
            "created": mv.creation_timestamp,
        }
        for mv in found
    ]
    return sorted(rows, key=lambda r: int(r["version"]))


def load_model(uri: str, flavor: str = "pyfunc") -> Any:
    """Load a model by URI (``models:/name@alias``, ``runs:/...``) with the given flavour."""
    module = {"sklearn": mlflow.sklearn, "pytorch": mlflow.pytorch, "pyfunc": mlflow.pyfunc}[flavor]
    return module.load_model(uri)
