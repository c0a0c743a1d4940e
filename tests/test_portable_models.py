"""The registered models load in a fresh virtual environment built only from their logged requirements.

For each of ``bonemet-classifier`` and ``bonemet-segmenter``: register it in a local MLflow store, build
a new venv with ``python -m venv`` and ``pip install -r`` the model's own ``requirements.txt``
(torch comes as ``torch==2.13.0`` from the local wheel), load the model there by its alias from the
same store (its code travels with it: no bonemet installed) and compare its answers with this
environment's. Minutes: most of it is pip installing MLflow's dependencies (from pip's cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

LOAD_CLASSIFIER = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/bonemet-classifier@staging")
out = model.predict(pd.read_parquet(sys.argv[1]))
import bonemet
print(json.dumps({"probability": out["probability_breast"].tolist(), "in_domain": out["in_domain"].tolist(),
                  "bonemet": bonemet.__file__}))
"""

LOAD_SEGMENTER = """
import json, sys
import mlflow, numpy as np, torch
torch.set_num_threads(1)
network = mlflow.pytorch.load_model("models:/bonemet-segmenter@staging")
network.eval()
with torch.no_grad():
    logits = network(torch.from_numpy(np.load(sys.argv[1]))).numpy()
np.save(sys.argv[2], logits)
import bonemet
print(json.dumps({"bonemet": bonemet.__file__}))
"""


def _fresh_envs(requirements: dict[str, Path], where: Path) -> dict[str, Path]:
    """A new virtual environment per entry with exactly its requirements installed, the installs
    side by side (most of the test's time is pip unpacking wheels); returns each one's python."""
    procs = {}
    for name, path in requirements.items():
        subprocess.run([sys.executable, "-m", "venv", str(where / name)], check=True, timeout=300)
        python = where / name / "bin" / "python"
        procs[name] = (python, subprocess.Popen([str(python), "-m", "pip", "install", "--quiet", "-r", str(path)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for name, (_, proc) in procs.items():
        _, stderr = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
    return {name: python for name, (python, _) in procs.items()}


def _run(python: Path, script: str, *args: str, store: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(MLFLOW_TRACKING_URI=store, MLFLOW_DISABLE_TELEMETRY="true", PATH=f"{python.parent}:{env['PATH']}")
    proc = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=600, env=env,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _requirements(model_uri: str) -> Path:
    import mlflow

    path = Path(mlflow.pyfunc.get_model_dependencies(model_uri))
    lines = path.read_text().split()
    assert not any(line.startswith("bonemet") for line in lines)  # our code travels with the model
    assert all("==" in line for line in lines), lines  # every requirement pinned
    return path


def test_registered_models_load_in_a_fresh_environment(tmp_path, params, monkeypatch):
    import torch

    from bonemet.registry.pyfunc import log_classifier
    from bonemet.registry.registration import log_segmenter
    from bonemet.registry.store import MlflowTracker, register_model, set_alias
    from bonemet.segmentation.networks import network_from_spec
    from serving_data import NAMES, feature_tables, fitted_domain, fitted_model

    monkeypatch.chdir(tmp_path)
    tracker = MlflowTracker("portable", tracking_uri=None, store_dir=tmp_path / "mlruns", system_metrics=False,
                            system_metrics_interval_s=None)
    store, registry = tracker.tracking_uri, tracker.client
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # MLflow's own API (_requirements) reads the store from it
    primary, paired = feature_tables(n=60, seed=0)
    fitted = fitted_model(primary, paired, params)
    with tracker.run("classifier"):
        info = log_classifier(tracker, fitted, NAMES, threshold=0.5, model_name="logreg",
                              domain=fitted_domain(fitted, primary, params.train.domain), check_rows=primary)
    set_alias(registry, "bonemet-classifier", "staging", register_model(registry, info, "bonemet-classifier"))

    torch.manual_seed(0)
    segment = params.segment.updated({"roi_size": [16, 16, 16]})
    network = network_from_spec(segment).eval()
    example = np.random.default_rng(0).random((1, 1, 16, 16, 16), dtype=np.float32)
    with tracker.run("segmenter"):
        info = log_segmenter(tracker, network, example, {"network": "missu"}, name="model")
    set_alias(registry, "bonemet-segmenter", "staging", register_model(registry, info, "bonemet-segmenter"))

    rows = feature_tables(n=20, seed=5)[0]
    rows.to_parquet(tmp_path / "rows.parquet")
    np.save(tmp_path / "example.npy", example)
    torch.set_num_threads(1)
    with torch.no_grad():
        expected_logits = network(torch.from_numpy(example)).numpy()
    expected = fitted.predict_proba(rows[NAMES])[:, 1]

    requirements = {"venv-classifier": _requirements("models:/bonemet-classifier@staging"),
                    "venv-missu": _requirements("models:/bonemet-segmenter@staging")}
    assert any(line == "torch==2.13.0" for line in requirements["venv-missu"].read_text().split())
    pythons = _fresh_envs(requirements, tmp_path)
    got = _run(pythons["venv-classifier"], LOAD_CLASSIFIER, str(tmp_path / "rows.parquet"), store=store, cwd=tmp_path)
    assert "venv-classifier" not in got["bonemet"] and "/code/bonemet/" in got["bonemet"]  # the logged code
    assert np.array_equal(np.asarray(got["probability"]), expected)  # bit for bit
    assert len(got["in_domain"]) == len(rows)

    got = _run(pythons["venv-missu"], LOAD_SEGMENTER, str(tmp_path / "example.npy"), str(tmp_path / "logits.npy"),
               store=store, cwd=tmp_path)
    assert "/code/bonemet/" in got["bonemet"]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected_logits, rtol=1e-5, atol=1e-6)
