"""Shared fixtures: small data the tests make themselves."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# ``set_tracking_uri`` and ``set_experiment`` write these into ``os.environ`` (for subprocesses).
_MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def _mlflow_uri_state():
    """MLflow's URI and experiment environment variables and module state (the tracking and registry
    URIs, the active experiment id), to put back with :func:`_restore_mlflow_uri`."""
    import sys

    env = {name: os.environ.get(name) for name in _MLFLOW_URI_VARS}
    if "mlflow" not in sys.modules:
        return env, None
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return env, (tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id)


def _restore_mlflow_uri(state) -> None:
    import sys

    env, uris = state
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if "mlflow" in sys.modules:
        from mlflow.tracking import fluent
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        (tracking_utils._tracking_uri, registry_utils._registry_uri,
         fluent._active_experiment_id) = uris or (None, None, None)


@pytest.fixture(autouse=True, scope="module")
def _mlflow_uri_isolated_per_module():
    """``mlflow.set_tracking_uri`` writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` (for subprocesses):
    a module-scoped store fixture would otherwise become every later module's store (and its
    subprocesses'). Autouse, so it is set up before the module's own fixtures and torn down after."""
    state = _mlflow_uri_state()
    yield
    _restore_mlflow_uri(state)


@pytest.fixture(autouse=True)
def _mlflow_uri_isolated():
    """The same per test: one test's store (or a dead server) never becomes a later test's; a
    module-scoped store fixture, set up before this snapshot, stays in place for the module."""
    state = _mlflow_uri_state()
    yield
    _restore_mlflow_uri(state)


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    """Keep each test on few threads: CI has 2 cores."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    yield


@pytest.fixture(scope="session")
def params():
    """The repository's params.yaml as validated, frozen specs (tests derive settings with ``.updated``)."""
    import planned

    return planned.load()


@pytest.fixture
def params_file(tmp_path):
    """``write(overrides, path=None)``: the repository's params.yaml with the planned settings' test
    values (tests/planned.py) and ``overrides`` deep-merged in,
    written to ``path`` (default ``tmp_path / "params.yaml"``); returns the path. A complete,
    valid file for the stage commands, which validate every section."""
    from pathlib import Path

    import yaml

    import planned
    from bonemet.config import deep_merge, load_params

    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"

    def write(overrides=None, path=None):
        path = Path(path) if path is not None else tmp_path / "params.yaml"
        # the planned settings as explicit test values (the stages then need no plan), unless overridden
        base = deep_merge(load_params(repo_params), planned.explicit_overrides())
        path.write_text(yaml.safe_dump(deep_merge(base, overrides or {})), encoding="utf-8")
        return path

    return write
