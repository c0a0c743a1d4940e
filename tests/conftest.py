"""Shared fixtures: small data the tests make themselves."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


#: MLflow's environment variables for a store, an experiment and a run (``mlflow.set_tracking_uri``
#: and ``set_experiment`` write the first ones for subprocesses).
_MLFLOW_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def _no_mlflow_state_left_behind(monkeypatch):
    """Nothing is patched or restored here: the library names its store, experiment and run on every
    call (``bonemet.registry.store``) and tests set MLflow's variables with ``monkeypatch``. This
    only checks it: a test that leaves a store, an experiment or an active run behind for the next
    test fails here, instead of the next test writing into its store."""
    import sys

    before = {name: os.environ.get(name) for name in _MLFLOW_VARS}
    yield
    monkeypatch.undo()  # the test's own settings go first (the fixture is torn down before monkeypatch)
    after = {name: os.environ.get(name) for name in _MLFLOW_VARS}
    assert after == before, f"the test changed MLflow's environment: {before} -> {after}"
    if "mlflow" in sys.modules:
        assert sys.modules["mlflow"].active_run() is None, "the test left an active MLflow run"


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
