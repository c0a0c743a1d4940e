"""The MLflow store: configuration, the tracker, versions and aliases.

The project's store: ``sqlite:///<tracking.store_dir>/mlflow.db`` with artifacts under
``<tracking.store_dir>/artifacts``; ``MLFLOW_TRACKING_URI`` (read by the entry point, passed in
here) points at a team server instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bonemet.errors import UserError
from bonemet.registry.local import default_tracking_uri
from bonemet.tracking.base import DatasetInput, Tracker
from bonemet.utils import UNWRITABLE, pid_alive

log = logging.getLogger(__name__)

def configure(tracking_uri: str | None, store_dir: str | Path) -> str:
    """Point MLflow at ``tracking_uri`` (or the local SQLite store); returns the URI used.

    A SQLite store is created (its tables migrated to this MLflow's schema) under an exclusive
    file lock beside it: two processes starting on a new store at once (queued experiments, ``dvc
    queue start -j 2``) would otherwise both migrate it and one fail. Later writes wait for each
    other through SQLite's busy timeout (MLflow sets 20 s)."""
    uri = tracking_uri or default_tracking_uri(store_dir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(db.with_name(f".{db.name}.lock")):
            client = MlflowClient()
            client.search_experiments(max_results=1)  # the tracking tables, created or migrated once
            client.search_registered_models(max_results=1)  # and the registry's
    return uri


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), released on exit."""
    import fcntl

    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


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


#: Tags naming the process that opened a run: a run still RUNNING whose process is gone was killed.
OWNER_HOST_TAG = "bonemet.host"
OWNER_PID_TAG = "bonemet.pid"


class TrackingUnavailableError(UserError):
    """The MLflow tracking store cannot be reached or written: the stage stops rather than lose runs."""


def _store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the store is unreachable or full (not that we called it wrongly)."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    if isinstance(exc, OSError) and exc.errno in UNWRITABLE:
        return True
    if isinstance(exc, MlflowException):
        text = str(exc)
        return "API request to" in text and ("Max retries" in text or "Connection" in text or "timed out" in text)
    return False


@contextlib.contextmanager
def _guard(uri: str, what: str) -> Iterator[None]:
    """Turn an unreachable or full store into :class:`TrackingUnavailableError`; anything else propagates."""
    try:
        yield
    except Exception as exc:
        if not _store_failure(exc):
            raise
        raise TrackingUnavailableError(
            f"the MLflow tracking store {uri} failed while {what} ({type(exc).__name__}: {str(exc)[:300]}); the "
            "stage stops so that no run goes silently missing: rerun it (`dvc repro`) once the store is back. "
            "The open run is marked FAILED when the store can be reached again"
        ) from exc


def fail_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark FAILED the runs of ``experiment_id`` left RUNNING by a process of this host that is gone
    (killed: SIGKILL, out of memory, power loss); returns their ids."""
    host = socket.gethostname()
    client = MlflowClient()
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                            f"tags.`{OWNER_HOST_TAG}` = '{host}'", max_results=500)
    failed = []
    for run in runs:
        pid = int(run.data.tags.get(OWNER_PID_TAG, "0") or 0)
        if pid <= 0 or pid == os.getpid() or pid_alive(pid):
            continue
        client.set_tag(run.info.run_id, "bonemet.failed_reason", f"process {pid} ended without closing the run")
        client.set_terminated(run.info.run_id, status="FAILED")
        failed.append(run.info.run_id)
    if failed:
        log.warning("marked %d run(s) FAILED that a killed process had left RUNNING: %s", len(failed),
                    ", ".join(failed[:10]))
    return failed


class MlflowTracker(Tracker):
    """Tracker writing to MLflow; runs opened inside another run are nested.

    Every run is tagged with the host and process that opened it; on construction, runs of the
    experiment that a killed process left RUNNING are marked FAILED. An unreachable or full
    store is a :class:`TrackingUnavailableError` (after MLflow's own retries), never a silently
    missing run.
    """

    def __init__(
        self,
        experiment: str,
        *,
        tracking_uri: str | None,
        store_dir: str | Path,
        default_tags: Mapping[str, str] | None = None,
        inputs: Sequence[DatasetInput] = (),
        system_metrics: bool,
        system_metrics_interval_s: float | None,
    ) -> None:
        """``inputs``: datasets logged on every run this tracker opens (parent and nested), so the
        UI's Dataset column says which data each run saw. ``system_metrics``: CPU, memory (and
        GPU) use sampled every ``system_metrics_interval_s`` seconds on the top-level runs."""
        self.tracking_uri = configure(tracking_uri, store_dir)
        with _guard(self.tracking_uri, f"opening experiment '{experiment}'"):
            self.experiment_id = ensure_experiment(experiment, store_dir)
            fail_abandoned_runs(self.experiment_id)
        self.default_tags = {k: str(v) for k, v in (default_tags or {}).items()}
        self.default_tags |= {OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid())}
        self.inputs = tuple(inputs)
        self.system_metrics = system_metrics
        if system_metrics and system_metrics_interval_s is not None:
            mlflow.system_metrics.set_system_metrics_sampling_interval(system_metrics_interval_s)

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False) -> Iterator[str]:
        nested = nested or mlflow.active_run() is not None
        all_tags = {**self.default_tags, **{k: str(v) for k, v in (tags or {}).items()}}
        with _guard(self.tracking_uri, f"opening run '{name}'"):
            active = mlflow.start_run(run_name=name, experiment_id=self.experiment_id, nested=nested, tags=all_tags,
                                      log_system_metrics=self.system_metrics and not nested)
            for dataset in self.inputs:
                self.log_input(dataset)
        try:
            yield active.info.run_id
            if not nested:
                self._log_stage_log()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the store may be what failed: the next start marks it FAILED
                mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        with _guard(self.tracking_uri, f"closing run '{name}'"):
            mlflow.end_run(status="FINISHED")

    def _log_stage_log(self) -> None:
        """The stage's log (its lines and warnings in full), and the warning count, on the top-level run."""
        from bonemet.utils import active_warnings_log, warning_counts

        path = active_warnings_log()
        if path is None or not path.is_file():
            return
        with _guard(self.tracking_uri, "uploading the stage's log"):
            mlflow.log_metric("warnings", float(sum(warning_counts(path).values())))
            if path.stat().st_size:
                mlflow.log_artifact(str(path), artifact_path="logs")

    def log_input(self, dataset: DatasetInput) -> None:
        import mlflow.data
        from mlflow.data.dataset_source_registry import get_registered_sources

        # a local file's source, named explicitly: resolving a path string matches two registered
        # local sources and warns on every run
        local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
        with warnings.catch_warnings(), _guard(self.tracking_uri, f"logging dataset '{dataset.name}'"):
            # the schema's hint on integer columns is about a model's inputs at inference, not a dataset record
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
            data = mlflow.data.from_pandas(dataset.table, source=local(Path(dataset.source).resolve().as_uri()),
                                           name=dataset.name, digest=dataset.digest[:36])
            mlflow.log_input(data, context=dataset.context, tags={k: str(v) for k, v in dataset.tags.items()})

    def log_params(self, params: Mapping[str, Any]) -> None:
        with _guard(self.tracking_uri, "logging params"):
            mlflow.log_params(_flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        with _guard(self.tracking_uri, "logging metrics"):
            mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        with _guard(self.tracking_uri, "setting tags"):
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        with _guard(self.tracking_uri, f"uploading {path.name}"):
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        with _guard(self.tracking_uri, f"uploading {name}"):
            mlflow.log_figure(figure, name)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        with _guard(self.tracking_uri, f"uploading {name}"):
            mlflow.log_dict(dict(data), name)

    def log_table(self, table: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            if name.endswith(".csv"):
                table.to_csv(path, index=False)
            else:
                table.to_json(path, orient="records", indent=1)
            parent = str(Path(name).parent) if Path(name).parent != Path(".") else None
            with _guard(self.tracking_uri, f"uploading {name}"):
                mlflow.log_artifact(str(path), artifact_path=parent)

    def log_model(self, model: Any, name: str, **kwargs: Any) -> Any:
        """Log a model. ``flavor`` in kwargs: 'sklearn' (default), 'pytorch' or 'pyfunc'."""
        flavor = kwargs.pop("flavor", "sklearn")
        module = {"sklearn": mlflow.sklearn, "pytorch": mlflow.pytorch, "pyfunc": mlflow.pyfunc}[flavor]
        with _guard(self.tracking_uri, f"logging model '{name}'"):
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
