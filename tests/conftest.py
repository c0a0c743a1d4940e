"""Shared fixtures: small data the tests make themselves."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


_MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _mlflow_uri_isolated():
    """``mlflow.set_tracking_uri`` writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` (for subprocesses):
    without this, one test's store (or a dead server) becomes every later test's and every
    subprocess's. The variables and MLflow's module state are put back after each test as they were
    before it (a module-scoped store fixture, set up before this snapshot, stays in place)."""
    import sys

    def mlflow_state():
        if "mlflow" not in sys.modules:
            return None
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        return tracking_utils, registry_utils, tracking_utils._tracking_uri, registry_utils._registry_uri

    before_env = {name: os.environ.get(name) for name in _MLFLOW_URI_VARS}
    before = mlflow_state()
    yield
    for name, value in before_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    after = mlflow_state()
    if after is not None:
        tracking_utils, registry_utils = after[:2]
        tracking_utils._tracking_uri, registry_utils._registry_uri = (before[2:] if before else (None, None))


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
