"""The MLflow store: the store's client, the tracker, versions and aliases.

The project's store: ``sqlite:///<tracking.store_dir>/mlflow.db`` with artifacts under
``<tracking.store_dir>/artifacts``; ``MLFLOW_TRACKING_URI`` (read by the entry point, passed in
here) points at a team server instead.

Every call goes to an explicit :class:`~mlflow.tracking.MlflowClient` bound to the store's URI,
with explicit experiment and run ids: nothing here sets MLflow's global tracking or registry URI,
active experiment or active run, so two trackers on two stores in one process never write into
each other's. The one exception is :func:`_fluent_scope`: MLflow's flavour ``log_model`` and
``load_model`` of a ``models:/`` URI take no store argument; for that single call it points the
global URIs at the store (and makes the tracker's run the active run) and puts everything back.
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

from bonemet.config import TrackingSpec
from bonemet.errors import UserError
from bonemet.registry.local import default_tracking_uri
from bonemet.tracking.base import DatasetInput, Tracker
from bonemet.utils import UNWRITABLE, pid_alive

log = logging.getLogger(__name__)


def store_uri(tracking_uri: str | None, store_dir: str | Path) -> str:
    """The store's URI: ``tracking_uri``, or the local SQLite store in ``store_dir``, created.

    A SQLite store is created (its tables migrated to this MLflow's schema) under an exclusive
    file lock beside it: two processes starting on a new store at once (queued experiments, ``dvc
    queue start -j 2``) would otherwise both migrate it and one fail. Later writes wait for each
    other through SQLite's busy timeout (MLflow sets 20 s). MLflow's global state is not touched."""
    uri = tracking_uri or default_tracking_uri(store_dir)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(db.with_name(f".{db.name}.lock")):
            store = MlflowClient(tracking_uri=uri, registry_uri=uri)
            store.search_experiments(max_results=1)  # the tracking tables, created or migrated once
            store.search_registered_models(max_results=1)  # and the registry's
    return uri


def client(tracking_uri: str | None, store_dir: str | Path) -> MlflowClient:
    """An MlflowClient bound to the store (tracking and registry): see :func:`store_uri`."""
    uri = store_uri(tracking_uri, store_dir)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def http_settings(tracking: TrackingSpec) -> None:
    """MLflow's request retries and timeout from ``tracking`` (the user's environment wins): how
    long a stage waits for an unreachable team server."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(tracking.http_max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(tracking.http_backoff_factor))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(tracking.http_timeout_s))


def project_store(tracking: TrackingSpec, tracking_uri: str | None) -> MlflowClient:
    """The client of ``tracking_uri`` (a team server; the entry point reads ``MLFLOW_TRACKING_URI``)
    or of the project's store (``tracking.store_dir``), created if needed, with ``tracking``'s HTTP
    settings (:func:`http_settings`); its ``tracking_uri`` is the URI."""
    http_settings(tracking)
    return client(tracking_uri, tracking.store_dir)


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


#: The environment variables ``mlflow.set_tracking_uri`` / ``set_registry_uri`` write (for subprocesses).
_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def _fluent_scope(uri: str, run_id: str | None = None) -> Iterator[None]:
    """MLflow's global ("fluent") state pointed at the store ``uri`` for one call, then put back.

    The only place bonemet touches that state, for the MLflow functions that take no store or run
    argument: a flavour's ``log_model`` (MLflow 3.17's ``Model.log`` writes through a client on
    the global tracking URI and creates its LoggedModel in the active run's experiment;
    ``pyfunc.log_model`` takes no run id, and ``Model.log``'s ``run_id`` alone would leave the
    LoggedModel in the default experiment), ``load_model`` / ``get_model_info`` of a ``models:/``
    URI (the global registry URI) and ``create_model_version`` of a SQL registry (MLflow's
    ``SqlAlchemyStore`` looks the logged model up with ``MlflowClient()``, on the global tracking
    URI: a TODO in MLflow 3.17). Inside, the global tracking and registry URIs are
    ``uri`` and, given ``run_id``, that run is the active run: pushed on MLflow's active-run
    stack, not started or ended (its tracker owns it). On exit the URIs, their environment
    variables and the active-run stack are exactly as they were."""
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_tracking, saved_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    saved_env = {name: os.environ.get(name) for name in _URI_VARS}
    stack = fluent._active_run_stack.get()
    depth = len(stack)
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        if run_id is not None:
            stack.append(fluent.ActiveRun(MlflowClient(tracking_uri=uri).get_run(run_id)))
        yield
    finally:
        del stack[depth:]
        tracking_utils.set_tracking_uri(saved_tracking)
        registry_utils._registry_uri = saved_registry
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: The MLflow UI (3.x) opens an experiment on its runs, not on its GenAI overview, with this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(store: MlflowClient, name: str, store_dir: str | Path) -> str:
    """The experiment's id in ``store``, created if needed (artifacts under ``store_dir/artifacts``
    for a local store) and tagged as a model-training experiment so that the UI opens on its runs."""
    experiment = store.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            store.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    artifact_location = None
    if store.tracking_uri.startswith("sqlite:"):
        artifact_location = (Path(store_dir) / "artifacts" / name).resolve().as_uri()
    return store.create_experiment(name, artifact_location=artifact_location,
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


def fail_abandoned_runs(store: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the runs of ``experiment_id`` left RUNNING by a process of this host that is gone
    (killed: SIGKILL, out of memory, power loss); returns their ids."""
    host = socket.gethostname()
    runs = store.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                           f"tags.`{OWNER_HOST_TAG}` = '{host}'", max_results=500)
    failed = []
    for run in runs:
        pid = int(run.data.tags.get(OWNER_PID_TAG, "0") or 0)
        if pid <= 0 or pid == os.getpid() or pid_alive(pid):
            continue
        store.set_tag(run.info.run_id, "bonemet.failed_reason", f"process {pid} ended without closing the run")
        store.set_terminated(run.info.run_id, status="FAILED")
        failed.append(run.info.run_id)
    if failed:
        log.warning("marked %d run(s) FAILED that a killed process had left RUNNING: %s", len(failed),
                    ", ".join(failed[:10]))
    return failed


class MlflowTracker(Tracker):
    """Tracker writing to MLflow through its own client; runs opened inside another run are nested.

    The tracker keeps its open runs itself (a stack of run ids; a nested run is tagged
    ``mlflow.parentRunId`` with the enclosing one) and never sets MLflow's active run, experiment
    or URIs: every call names the store (``client``), the experiment and the run. Every run is
    tagged with the host and process that opened it; on construction, runs of the experiment that
    a killed process left RUNNING are marked FAILED. An unreachable or full store is a
    :class:`TrackingUnavailableError` (after MLflow's own retries), never a silently missing run.
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
        GPU) use sampled every ``system_metrics_interval_s`` seconds (None: MLflow's own interval)
        on the top-level runs."""
        self.client = client(tracking_uri, store_dir)
        self.tracking_uri: str = self.client.tracking_uri
        with _guard(self.tracking_uri, f"opening experiment '{experiment}'"):
            self.experiment_id = ensure_experiment(self.client, experiment, store_dir)
            fail_abandoned_runs(self.client, self.experiment_id)
        self.default_tags = {k: str(v) for k, v in (default_tags or {}).items()}
        self.default_tags |= {OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid())}
        self.inputs = tuple(inputs)
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self._open: list[str] = []  # the ids of this tracker's open runs, innermost last

    @classmethod
    def for_stage(cls, tracking: TrackingSpec, experiment: str, *, tracking_uri: str | None,
                  default_tags: Mapping[str, str], inputs: Sequence[DatasetInput], long_running: bool) -> MlflowTracker:
        """A stage's tracker for ``experiment`` on :func:`project_store`'s store: system metrics when
        the stage is ``long_running`` and ``tracking.system_metrics`` is on."""
        http_settings(tracking)
        return cls(experiment, tracking_uri=tracking_uri, store_dir=tracking.store_dir, default_tags=default_tags,
                   inputs=inputs, system_metrics=long_running and tracking.system_metrics,
                   system_metrics_interval_s=tracking.system_metrics_interval_s)

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False) -> Iterator[str]:
        parent = self._open[-1] if self._open else None
        top = parent is None and not nested
        with _guard(self.tracking_uri, f"opening run '{name}'"):
            run_id = self._create_run(name, tags, parent)
        self._open.append(run_id)
        monitor = self._start_system_metrics(run_id) if top and self.system_metrics else None
        try:
            for dataset in self.inputs:
                self.log_input(dataset)
            yield run_id
            if top:
                self._log_stage_log(run_id)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the store may be what failed: the next start marks it FAILED
                self._end_run(run_id, monitor, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        with _guard(self.tracking_uri, f"closing run '{name}'"):
            self._end_run(run_id, monitor, "FINISHED")

    def _create_run(self, name: str, tags: Mapping[str, str] | None, parent: str | None) -> str:
        """A new run of the experiment with the default tags, ``tags``, MLflow's context tags (user,
        source, git commit: as ``mlflow.start_run`` sets them) and, when nested, its parent."""
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        all_tags = {**self.default_tags, **{k: str(v) for k, v in (tags or {}).items()}, MLFLOW_RUN_NAME: name}
        if parent is not None:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=resolve_tags(all_tags)).info.run_id

    def _end_run(self, run_id: str, monitor: Any, status: str) -> None:
        """Close ``run_id`` (innermost open run) with ``status``: FINISHED, FAILED or KILLED."""
        if self._open and self._open[-1] == run_id:
            self._open.pop()
        if monitor is not None:
            monitor.finish()  # its last samples flushed while the run is still RUNNING
        self.client.set_terminated(run_id, status)

    def _start_system_metrics(self, run_id: str) -> Any:
        """MLflow's system-metrics monitor on ``run_id`` of this store, started (None if it cannot start)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, tracking_uri=self.tracking_uri)
            if self.system_metrics_interval_s is not None:
                monitor.sampling_interval = self.system_metrics_interval_s
            monitor.start()
            return monitor
        except Exception as exc:  # noqa: BLE001 - as mlflow.start_run: the run goes on without them
            log.error("system metrics could not be started on run %s: %s", run_id, exc)
            return None

    @property
    def _run_id(self) -> str:
        if not self._open:
            raise RuntimeError("MlflowTracker: no open run (log inside `with tracker.run(...)`)")
        return self._open[-1]

    def _log_stage_log(self, run_id: str) -> None:
        """The stage's log (its lines and warnings in full), and the warning count, on the top-level run."""
        from bonemet.utils import active_warnings_log, warning_counts

        path = active_warnings_log()
        if path is None or not path.is_file():
            return
        with _guard(self.tracking_uri, "uploading the stage's log"):
            self.client.log_metric(run_id, "warnings", float(sum(warning_counts(path).values())))
            if path.stat().st_size:
                self.client.log_artifact(run_id, str(path), artifact_path="logs")

    def log_input(self, dataset: DatasetInput) -> None:
        import mlflow.data
        from mlflow.data.dataset_source_registry import get_registered_sources
        from mlflow.entities import DatasetInput as MlflowDatasetInput
        from mlflow.entities import InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        # a local file's source, named explicitly: resolving a path string matches two registered
        # local sources and warns on every run
        local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
        with warnings.catch_warnings(), _guard(self.tracking_uri, f"logging dataset '{dataset.name}'"):
            # the schema's hint on integer columns is about a model's inputs at inference, not a dataset record
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
            data = mlflow.data.from_pandas(dataset.table, source=local(Path(dataset.source).resolve().as_uri()),
                                           name=dataset.name, digest=dataset.digest[:36])
            tags = [InputTag(key=k, value=str(v)) for k, v in dataset.tags.items()]
            tags.append(InputTag(key=MLFLOW_DATASET_CONTEXT, value=dataset.context))  # as mlflow.log_input
            self.client.log_inputs(self._run_id, [MlflowDatasetInput(dataset=data._to_mlflow_entity(), tags=tags)])

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        with _guard(self.tracking_uri, "logging params"):
            self.client.log_batch(self._run_id, params=[Param(k, v) for k, v in _flatten(params).items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        clean = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        with _guard(self.tracking_uri, "logging metrics"):
            self.client.log_batch(self._run_id, metrics=clean)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        with _guard(self.tracking_uri, "setting tags"):
            self.client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        with _guard(self.tracking_uri, f"uploading {path.name}"):
            if path.is_dir():
                self.client.log_artifacts(self._run_id, str(path), artifact_path=artifact_path)
            else:
                self.client.log_artifact(self._run_id, str(path), artifact_path=artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        with _guard(self.tracking_uri, f"uploading {name}"):
            self.client.log_figure(self._run_id, figure, name)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        with _guard(self.tracking_uri, f"uploading {name}"):
            self.client.log_dict(self._run_id, dict(data), name)

    def log_table(self, table: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            if name.endswith(".csv"):
                table.to_csv(path, index=False)
            else:
                table.to_json(path, orient="records", indent=1)
            parent = str(Path(name).parent) if Path(name).parent != Path(".") else None
            with _guard(self.tracking_uri, f"uploading {name}"):
                self.client.log_artifact(self._run_id, str(path), artifact_path=parent)

    def log_model(self, model: Any, name: str, **kwargs: Any) -> Any:
        """Log a model in the open run; returns MLflow's ModelInfo. ``flavor`` in kwargs: 'sklearn'
        (default), 'pytorch' or 'pyfunc' (``model`` is then the ``python_model``); the other kwargs
        go to that flavour's ``log_model``. The flavours take no store or run: see :func:`_fluent_scope`."""
        flavor = kwargs.pop("flavor", "sklearn")
        module = _flavor(flavor)
        with _guard(self.tracking_uri, f"logging model '{name}'"), _fluent_scope(self.tracking_uri, self._run_id):
            if flavor == "pyfunc":
                return module.log_model(name=name, python_model=model, **kwargs)
            return module.log_model(model, name=name, **kwargs)


def _flavor(flavor: str) -> Any:
    """MLflow's module of a model flavour: 'sklearn', 'pytorch' or 'pyfunc'."""
    return {"sklearn": mlflow.sklearn, "pytorch": mlflow.pytorch, "pyfunc": mlflow.pyfunc}[flavor]


# --- model registry -------------------------------------------------------------------------
# Aliases (`staging`, `production`), never the deprecated stages. Each function is given the
# store's client (:func:`client`, ``MlflowTracker.client``).


def register_model(
    store: MlflowClient,
    model: Any,
    name: str,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Register the logged ``model`` (the ModelInfo ``log_model`` returned) as a new version of
    ``name`` (created if needed); returns the version. As ``mlflow.register_model`` does: the
    version's source is the logged model (``models:/<model_id>``) and the logged model's
    ``mlflow.modelVersions`` tag lists it."""
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        store.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    with _fluent_scope(store.tracking_uri):  # MLflow's SQL registry reads the logged model through the global URI
        mv = store.create_model_version(name, model.model_uri, run_id=model.run_id, model_id=model.model_id,
                                        tags={k: str(v) for k, v in (tags or {}).items()}, description=description)
    listed = json.loads(store.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    store.set_logged_model_tags(model.model_id, {
        MLFLOW_MODEL_VERSIONS: json.dumps([*listed, {"name": mv.name, "version": mv.version}])})
    log.info("registered %s version %s from run %s", name, mv.version, model.run_id)
    return str(mv.version)


def set_alias(store: MlflowClient, name: str, alias: str, version: str | int) -> None:
    """Point ``name@alias`` at ``version``."""
    store.set_registered_model_alias(name, alias, str(version))
    log.info("%s@%s -> version %s", name, alias, version)


def alias_version(store: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``name@alias`` points at, or None when the model or alias does not exist."""
    try:
        return str(store.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_tags(store: MlflowClient, name: str, version: str) -> dict[str, str]:
    """The tags of version ``version`` of ``name``."""
    return dict(store.get_model_version(name, version).tags or {})


def model_versions(store: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every version of ``name``: version, aliases, run id, tags, description, creation time."""
    try:
        found = store.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    # search results do not carry aliases: read them from the registered model.
    try:
        by_version: dict[str, list[str]] = {}
        for alias, version in (store.get_registered_model(name).aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
    except MlflowException:
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


def load_model(store: MlflowClient | None, uri: str, flavor: str = "pyfunc", **kwargs: Any) -> Any:
    """Load a model of ``store`` by URI (``models:/name@alias``, ``models:/name/version``,
    ``runs:/...``; a local folder with ``store`` None) with the given flavour (kwargs: the
    flavour's ``load_model``'s)."""
    with _fluent_scope(store.tracking_uri) if store is not None else contextlib.nullcontext():
        return _flavor(flavor).load_model(uri, **kwargs)


def model_metadata(store: MlflowClient, uri: str) -> dict[str, Any]:
    """The metadata logged with the model at ``uri`` of ``store`` (``models:/name/version``)."""
    from mlflow.models import get_model_info

    with _fluent_scope(store.tracking_uri):
        return dict(get_model_info(uri).metadata or {})
