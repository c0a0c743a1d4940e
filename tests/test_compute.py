"""Preprocessing and radiomics on a Dask cluster (params compute.scheduler: dask) give the local pool's outputs."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pandas as pd
import pytest

import planned
from bonemet.compute import SchedulerUnavailableError, case_executor
from bonemet.config import ComputeSpec, ParamsError, load_params
from bonemet.data.manifest import read_manifest
from bonemet.data.synthetic import generate_cohort
from bonemet.preprocessing import preprocess_cohort
from bonemet.radiomics import extract_sources
from bonemet.tracking import RecordingTracker
from compute_specs import LOCAL_COMPUTE

PARAMS = planned.load()  # the planned settings with their test values (tests/planned.py)
TOL = PARAMS.validation.grid_tolerance_mm
#: Original image, two cheap classes: seconds per case
FAST = {
    "imageType": {"Original": {}},
    "featureClass": {"shape": [], "firstorder": [], "glcm": []},
    "setting": {"binWidth": 25, "resampledPixelSpacing": None, "label": 1},
}


@pytest.fixture(scope="module")
def cluster():
    """A Dask cluster of two worker processes on loopback (one thread each), as a team's would be."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1") as local:
        yield local


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort") / "raw"
    generate_cohort(root, n_cases=4, n_positive=2, seed=3, size="small", mask_label=1, show_progress=False)
    return root


def _dask(cluster) -> ComputeSpec:
    return ComputeSpec(scheduler="dask", dask_address=cluster.scheduler_address, dask_connect_timeout_s=30)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_preprocessing_on_dask_writes_the_local_pools_files(tmp_path, cohort, cluster, monkeypatch):
    # relative paths, as a stage gives them: the workers, started elsewhere, must still find the files
    monkeypatch.chdir(cohort.parent)
    outputs = {}
    for name, compute in (("local", LOCAL_COMPUTE), ("dask", _dask(cluster))):
        out = tmp_path / name
        spec = PARAMS.preprocess.updated({"out_dir": os.path.relpath(out), "n_jobs": 2})
        table = preprocess_cohort(cohort.name, spec, compute=compute, mask_label=1, grid_tolerance_mm=TOL, roi=None,
                                  seg_segment=None, pseudonym_key=None, show_progress=False)
        assert len(table) == 4
        outputs[name] = _digests(out)
    assert len(outputs["local"]) == 1 + 3 * 4  # cases.csv, then image, mask and geometry per case
    assert outputs["dask"] == outputs["local"]


def test_feature_tables_on_dask_equal_the_local_pools(tmp_path, cohort, cluster, monkeypatch):
    monkeypatch.chdir(cohort.parent)
    cases = read_manifest(cohort.name)  # relative paths, as the stage's
    tables = {}
    for name, compute in (("local", LOCAL_COMPUTE), ("dask", _dask(cluster))):
        tracker = RecordingTracker()
        extract_sources(cases, FAST, tmp_path / name, sources=["manual", "annotator"], auto_masks_dir=None,
                        n_jobs=2, compute=compute, cache_dir=os.path.relpath(tmp_path / f"cache_{name}"),
                        allow_drop=False, grid_tolerance_mm=TOL, show_progress=False, tracker=tracker)
        extracted = tracker.find("extract-manual")["metrics"]["n_extracted"][-1][1]
        assert extracted == 4  # computed on the workers, not read from a cache (MLflow's count, not the output's)
        tables[name] = {s: pd.read_parquet(tmp_path / name / f"{s}.parquet") for s in ("manual", "annotator")}
    for source in ("manual", "annotator"):
        local, dask = tables["local"][source], tables["dask"][source]
        assert local.shape[0] == 4 and local.shape[1] > 40
        pd.testing.assert_frame_equal(dask, local, check_exact=True)
    # the workers wrote the cache entries the local run reads: the same keys, the same content
    assert _digests(tmp_path / "cache_dask") == _digests(tmp_path / "cache_local")


def test_a_failing_case_on_dask_names_the_case(tmp_path, cohort, cluster):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in cohort.rglob("*"):
        target = broken / path.relative_to(cohort)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
    first = read_manifest(broken)[0]
    Path(first.image).write_bytes(b"not an image")
    spec = PARAMS.preprocess.updated({"out_dir": str(tmp_path / "pre"), "n_jobs": 2})
    with pytest.raises(Exception) as info:
        preprocess_cohort(broken, spec, compute=_dask(cluster), mask_label=1, grid_tolerance_mm=TOL, roi=None,
                          seg_segment=None, pseudonym_key=None, show_progress=False)
    assert isinstance(info.value, ValueError)  # the reader's UserError, raised again here from the worker
    assert any(f"case '{first.case_id}'" in note for note in getattr(info.value, "__notes__", []))
    assert not (tmp_path / "pre").exists()  # nothing half-written


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_scheduler_is_a_one_line_user_error():
    spec = ComputeSpec(scheduler="dask", dask_address=f"tcp://127.0.0.1:{_free_port()}", dask_connect_timeout_s=1)
    with pytest.raises(SchedulerUnavailableError, match=r"compute.dask_address tcp://127\.0\.0\.1:\d+: no Dask "
                                                        r"scheduler answered within 1 s"):
        with case_executor(spec, workers=2):
            pass


@pytest.mark.parametrize(("change", "message"), [
    ({"scheduler": "dask", "dask_address": None}, r"compute: .*dask_address must name the scheduler"),
    ({"dask_address": "tcp://10.0.0.1:8786"}, r"compute: .*scheduler is local but dask_address"),
    ({"scheduler": "ray"}, r"compute.scheduler: .*'local' or 'dask'"),
])
def test_compute_params_are_checked(change, message):
    from bonemet.config import build_specs

    raw = load_params("params.yaml")
    raw["compute"] = {**raw["compute"], **change}
    with pytest.raises(ParamsError, match=message):
        build_specs(raw)
