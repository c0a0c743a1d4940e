"""Faults (issue 18): a full disk, a read-only output folder, a killed run, a tracking server that
goes away mid-run. Each gives a clear error naming the path or the server; nothing already written
is lost; no run is left RUNNING or silently missing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bonemet.utils import OutputWriteError, atomic_path, write_json

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mount(tmp_path):
    """``mount(size_kib, read_only=False)``: a small tmpfs under tmp_path (root only; skipped elsewhere)."""
    mounted: list[Path] = []

    def make(size_kib: int, name: str = "disk") -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root")
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _remount_read_only(point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True, capture_output=True)


def _fill(point: Path) -> None:
    """Fill a file system to the last byte."""
    for name, chunk in (("filler", 65536), ("filler2", 1)):  # then the last partial block
        fd = os.open(point / name, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * chunk)
        except OSError:
            pass
        finally:
            os.close(fd)


def test_a_full_disk_is_an_error_naming_the_output_and_keeps_what_was_written(mount):
    disk = mount(256)
    write_json(disk / "metrics.json", {"auc": 0.9})
    _fill(disk)
    with pytest.raises(OutputWriteError, match=r"cannot write .*metrics\.json: no space left on the device") as err:
        write_json(disk / "metrics.json", {"auc": 0.5, "big": "x" * 200_000})
    assert err.value.filename == str(disk / "metrics.json")
    assert json.loads((disk / "metrics.json").read_text()) == {"auc": 0.9}  # the old output is intact
    assert not [p for p in disk.iterdir() if p.name.startswith(".metrics.json")]  # no temporary left


def test_a_read_only_folder_is_an_error_naming_the_output(mount):
    disk = mount(256)
    write_json(disk / "metrics.json", {"auc": 0.9})
    (disk / "folder").mkdir()
    (disk / "folder" / "a.txt").write_text("kept")
    _remount_read_only(disk)
    with pytest.raises(OutputWriteError, match=r"metrics\.json: the file system is read-only"):
        write_json(disk / "metrics.json", {"auc": 0.5})
    with pytest.raises(OutputWriteError, match=r"folder: the file system is read-only"):
        with atomic_path(disk / "folder", is_dir=True) as tmp:
            (tmp / "b.txt").write_text("new")
    assert (disk / "folder" / "a.txt").read_text() == "kept"


def test_images_on_a_full_disk_name_the_file(mount):
    from bonemet.data.io import write_image

    disk = mount(128)
    _fill(disk)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(40, 64, 64)).astype(np.float32))
    with pytest.raises(OutputWriteError, match=r"ct\.nii\.gz: no space left"):
        write_image(image, disk / "ct.nii.gz")


def test_a_stage_on_a_read_only_output_folder_says_so_in_one_line(mount, tmp_path, params_file):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    rows = ["case_id,label,image,mask"] + [f"c{i},{i % 2},x.nii.gz,y.nii.gz" for i in range(40)]
    (cohort / "manifest.csv").write_text("\n".join(rows) + "\n")
    disk = mount(256)
    (disk / "splits.json").write_text('{"old": true}')
    _remount_read_only(disk)
    path = params_file({"data": {"cohort_dir": str(cohort)}, "split": {"out": str(disk / "splits.json")}})
    proc = subprocess.run([sys.executable, "-m", "bonemet", "split", "--params", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot write {disk / 'splits.json'}: the file system is read-only" in proc.stderr
    assert (disk / "splits.json").read_text() == '{"old": true}'


# --- MLflow --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KILLED_RUN = """
import os, signal, sys
from bonemet.registry.store import MlflowTracker
tracker = MlflowTracker("faults", system_metrics=False, system_metrics_interval_s=None, tracking_uri=sys.argv[1], store_dir=sys.argv[2])
with tracker.run("stage") as run_id:
    with tracker.run("fold-0", nested=True):
        tracker.log_metrics({"loss": 1.0}, step=1)
        print(run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_is_marked_failed_on_the_next_start(tmp_path):
    from mlflow.tracking import MlflowClient

    from bonemet.registry.store import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, uri, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_id = proc.stdout.strip().splitlines()[-1]
    store = MlflowClient(tracking_uri=uri)
    assert store.get_run(run_id).info.status == "RUNNING"  # what a SIGKILL leaves
    MlflowTracker("faults", system_metrics=False, system_metrics_interval_s=None, tracking_uri=uri, store_dir=tmp_path)  # the next start of any stage
    experiment = store.get_experiment_by_name("faults")
    runs = store.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}  # the stage and its nested fold
    assert all("ended without closing the run" in r.data.tags["bonemet.failed_reason"] for r in runs)


def test_a_run_of_a_live_process_is_not_touched(tmp_path):
    from bonemet.registry.store import MlflowTracker, fail_abandoned_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker("faults", system_metrics=False, system_metrics_interval_s=None, tracking_uri=uri, store_dir=tmp_path)
    with tracker.run("stage") as run_id:
        assert fail_abandoned_runs(tracker.client, tracker.experiment_id) == []
        assert tracker.client.get_run(run_id).info.status == "RUNNING"
    assert tracker.client.get_run(run_id).info.status == "FINISHED"


UNREACHABLE = """
import sys, time
from bonemet.errors import UserError
from bonemet.registry.store import MlflowTracker
tracker = MlflowTracker("faults", system_metrics=False, system_metrics_interval_s=None, tracking_uri=sys.argv[1], store_dir=sys.argv[2])
try:
    with tracker.run("stage") as run_id:
        print(run_id, flush=True)
        tracker.log_metrics({"loss": 1.0}, step=1)
        open(sys.argv[3], "w").close()          # the test kills the server now
        while True:
            time.sleep(0.5)
            tracker.log_metrics({"loss": 0.5}, step=2)
except UserError as exc:
    print("USER ERROR:", exc, flush=True)
    sys.exit(1)
"""


def _server(port: int, tmp_path: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("mlflow server did not start")


@pytest.mark.slow
def test_a_tracking_server_gone_mid_run_stops_the_stage_with_one_line(tmp_path):
    from mlflow.tracking import MlflowClient

    port = _free_port()
    server = _server(port, tmp_path)
    uri = f"http://127.0.0.1:{port}"
    flag = tmp_path / "logged"
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
               MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    stage = subprocess.Popen([sys.executable, "-c", UNREACHABLE, uri, str(tmp_path), str(flag)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not flag.exists() and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        out, err = stage.communicate(timeout=180)
    finally:
        stage.kill()
    assert stage.returncode == 1, (out[-2000:], err[-3000:])
    assert "USER ERROR: the MLflow tracking store http://127.0.0.1" in out and "rerun it" in out, err[-3000:]
    assert "Traceback" not in err
    run_id = out.splitlines()[0].strip()
    # the server is back: the next start marks the abandoned run FAILED (it was not left RUNNING)
    server = _server(port, tmp_path)
    try:
        from bonemet.registry.store import MlflowTracker

        MlflowTracker("faults", system_metrics=False, system_metrics_interval_s=None, tracking_uri=uri, store_dir=tmp_path)
        assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"
    finally:
        os.killpg(server.pid, signal.SIGKILL)


POOL_PARENT = """
import sys, time
from concurrent.futures import ProcessPoolExecutor
from bonemet.utils import die_with_parent

def work(flag):
    import os
    open(flag, "w").write(str(os.getpid()))
    time.sleep(120)

with ProcessPoolExecutor(max_workers=1, initializer=die_with_parent) as pool:
    pool.submit(work, sys.argv[1])
    time.sleep(120)
"""


def test_a_killed_stage_leaves_no_worker_process_behind(tmp_path):
    """SIGKILL of a stage's process kills its pool workers too (they would idle forever, or go on
    writing checkpoints and cache entries next to the rerun's)."""
    flag = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-c", POOL_PARENT, str(flag)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (flag.exists() and flag.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        worker = int(flag.read_text())
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.time() + 10
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), f"worker {worker} outlived its killed parent"
    finally:
        parent.kill()
        if flag.exists() and flag.read_text() and _alive(int(flag.read_text())):
            os.kill(int(flag.read_text()), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_folder_output_removes_the_temporaries_a_killed_writer_left(tmp_path):
    """A killed stage leaves its temporary output folder (a whole preprocessed cohort); the next
    write of that output removes it, and leaves alone those of live writers and other outputs."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = int(gone.stdout)
    left = [tmp_path / f".out.{dead}.abcd_123", tmp_path / f".out.{dead}.old.zz99zz99"]
    kept = [tmp_path / f".out.{os.getpid()}.abcdefgh", tmp_path / f".out.x.{dead}.abcdefgh",
            tmp_path / f".output.{dead}.abcdefgh"]
    for path in left + kept:
        (path / "case").mkdir(parents=True)
    with atomic_path(tmp_path / "out", is_dir=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert not [p for p in left if p.exists()] and all(p.exists() for p in kept)
