"""The tracker interface used by the library, and trackers that need no server."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are finite numbers, as floats (None, NaN, inf, text and bools
    left out): what a metrics store can hold."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))}


@dataclass(frozen=True)
class DatasetInput:
    """A dataset a run reads, for MLflow's Dataset column (``mlflow.log_input``).

    ``table``: its rows (the cohort's manifest, a feature table); ``digest``: what identifies the
    data (the cohort's DVC md5, a file's md5); ``context``: how the run uses it ("training",
    "evaluation"); ``tags``: e.g. the case count.
    """

    name: str
    table: Any = field(repr=False)
    source: str
    digest: str
    context: str
    tags: Mapping[str, str]


class Tracker:
    """Interface of an experiment tracker. Every method is a no-op here.

    ``run`` opens a run (nested inside the current one when one is open) and yields its id.
    Metric names are the same across models and folds so runs compare side by side.
    """

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False) -> Iterator[str | None]:
        yield None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (flattened with dots when nested)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics, optionally at a step (epoch)."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags on the active run."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder to the active run."""

    def log_figure(self, figure: Any, name: str) -> None:
        """Log a matplotlib figure as an image artifact called ``name`` (e.g. ``roc.png``)."""

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Log a dict as a JSON/YAML artifact called ``name``."""

    def log_table(self, table: Any, name: str) -> None:
        """Log a pandas DataFrame as a table artifact (``name`` ends in .json or .csv)."""

    def log_model(self, model: Any, name: str, **kwargs: Any) -> Any:
        """Log a model in the open run (flavour chosen by the backend from ``kwargs['flavor']``); returns
        the backend's record of it (MLflow's ModelInfo: what registration needs), None when not kept."""
        return None

    def log_input(self, dataset: DatasetInput) -> None:
        """Record that the active run reads ``dataset``."""


class NullTracker(Tracker):
    """Tracks nothing: for tests and for library use without MLflow."""


class RecordingTracker(Tracker):
    """Keeps everything in memory; tests assert on ``runs``."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self._stack: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False) -> Iterator[str]:
        record: dict[str, Any] = {
            "name": name,
            "tags": dict(tags or {}),
            "parent": self._stack[-1]["name"] if self._stack else None,
            "params": {},
            "metrics": {},
            "artifacts": [],
            "inputs": [],
        }
        self.runs.append(record)
        self._stack.append(record)
        try:
            yield f"run-{len(self.runs)}"
        finally:
            self._stack.pop()

    @property
    def _active(self) -> dict[str, Any]:
        if not self._stack:
            raise RuntimeError("no active run")
        return self._stack[-1]

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._active["params"].update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self._active["metrics"].setdefault(key, []).append((step, float(value)))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._active["tags"].update(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._active["artifacts"].append(str(Path(artifact_path or "") / Path(path).name))

    def log_figure(self, figure: Any, name: str) -> None:
        self._active["artifacts"].append(name)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self._active["artifacts"].append(name)

    def log_table(self, table: Any, name: str) -> None:
        self._active["artifacts"].append(name)

    def log_model(self, model: Any, name: str, **kwargs: Any) -> Any:
        self._active["artifacts"].append(f"model:{name}")
        return None

    def log_input(self, dataset: DatasetInput) -> None:
        self._active["inputs"].append({"name": dataset.name, "digest": dataset.digest, "context": dataset.context,
                                       "source": dataset.source, "n_rows": len(dataset.table),
                                       "tags": dict(dataset.tags)})

    def find(self, name: str) -> dict[str, Any]:
        """The recorded run called ``name`` (KeyError if none)."""
        for record in self.runs:
            if record["name"] == name:
                return record
        raise KeyError(name)


class CallBuffer(Tracker):
    """Records tracker calls (picklable) so another process's tracker can replay them in order.

    A fold trained in a worker process logs into a ``CallBuffer``; the parent replays the calls
    into the real tracker with :func:`replay_calls` (same runs, params, per-step metrics and
    artifact files; only the timestamps are those of the replay). Figures and models are not
    buffered: log them from the parent.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False) -> Iterator[None]:
        self.calls.append(("run", (name,), {"tags": dict(tags or {}), "nested": nested}))
        try:
            yield None
        finally:
            self.calls.append(("end_run", (), {}))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.calls.append(("log_params", (dict(params),), {}))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.calls.append(("log_metrics", ({k: float(v) for k, v in metrics.items()},), {"step": step}))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.calls.append(("set_tags", (dict(tags),), {}))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.calls.append(("log_artifact", (str(path),), {"artifact_path": artifact_path}))

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self.calls.append(("log_dict", (dict(data), name), {}))

    def log_table(self, table: Any, name: str) -> None:
        self.calls.append(("log_table", (table, name), {}))

    def log_input(self, dataset: DatasetInput) -> None:
        self.calls.append(("log_input", (dataset,), {}))

    def log_figure(self, figure: Any, name: str) -> None:
        raise NotImplementedError("CallBuffer does not carry figures: save the figure and log_artifact the file")

    def log_model(self, model: Any, name: str, **kwargs: Any) -> Any:
        raise NotImplementedError("CallBuffer does not carry models: log the model from the parent process")


def replay_calls(calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]], tracker: Tracker) -> list[str | None]:
    """Replay a :class:`CallBuffer`'s calls into ``tracker``; returns the ids of the runs opened, in order."""
    opened: list[Any] = []
    run_ids: list[str | None] = []
    try:
        for method, args, kwargs in calls:
            if method == "run":
                context = tracker.run(*args, **kwargs)
                run_ids.append(context.__enter__())
                opened.append(context)
            elif method == "end_run":
                opened.pop().__exit__(None, None, None)
            else:
                getattr(tracker, method)(*args, **kwargs)
    finally:
        while opened:
            opened.pop().__exit__(None, None, None)
    return run_ids
