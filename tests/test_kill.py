"""SIGKILL of a stage at a random moment (issue 18, faults), then `dvc repro` again.

A tiny cohort goes once through the real DAG (``ci/smoke.sh`` with ``SMOKE_TARGET=train``, the
overrides below on top of ci/smoke_params.yaml): its outputs are the uninterrupted run. Then, for
each of preprocess, segment, extract and train, ``dvc repro -f -s <stage>`` is started and, once the
stage has written part of its work (its first per-case file, checkpoint, cache entry or model),
killed with SIGKILL at a seeded random moment: the stage's own process (``kill -9``, the
out-of-memory killer: DVC lives on and fails), or for train DVC's whole process group (a CI
timeout, a lost machine). Then:

- no process of the stage is left (its pool workers die with it);
- no output is half-written: every file under the stage's outputs is complete (it parses), and
  anything else is a hidden temporary (``.<name>.*``, :func:`bonemet.utils.atomic_path`);
- the per-case feature cache holds only entries that verify (extract);
- ``dvc repro -f -s <stage>`` completes, and its outputs are the uninterrupted run's: the
  same bytes, parquet tables equal (same columns in the same order, same values); only the train
  stage's record of its MLflow run ids (external state) differs: no output measures the run;
- no MLflow run is left RUNNING (the next start marks the killed one FAILED), and no temporary
  output folder of the killed run is left beside the outputs.

``BONEMET_KILL_SEED`` draws other moments (``for s in 1 2 3; do BONEMET_KILL_SEED=$s pytest ...``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"

pytestmark = pytest.mark.slow

#: Over ci/smoke_params.yaml: smaller still, so that four stages can each run twice and a half.
#: The low threshold keeps a 15-epoch network's masks non-empty (extract refuses empty ones).
OVERRIDES = {
    "data": {"synthetic": {"n_cases": 16, "n_positive": 7}},
    "split": {"n_folds": 2},
    "segment": {"threshold": 0.05, "inference": {"mirror_axes": []},
                "profiles": {"cpu": {"train": {"max_epochs": 15, "patience": 15}}}},
    "radiomics": {"sources": ["manual", "auto"]},
    "train": {"models": ["svm", "logreg", "random_forest", "xgboost", "lightgbm"], "log_models": False,
              "log_figures": False},
}

#: Original + two LoG sigmas (293 features instead of 1316): the same code paths, a fifth of the time.
RADIOMICS_SETTINGS = {
    "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 3.0]}},
    "featureClass": {name: None for name in ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")},
    "setting": {"binWidth": 25, "resampledPixelSpacing": [1.0, 1.0, 1.0], "interpolator": "sitkBSpline",
                "normalize": False, "label": 1, "padDistance": 5, "geometryTolerance": 0.0001, "distances": [1],
                "additionalInfo": False},
}


@dataclass(frozen=True)
class Stage:
    name: str
    #: a file (glob, relative to the work folder) that shows the stage has written part of its work
    started: str
    #: files not compared: external state (MLflow run ids); every other output is compared whole
    ignored: tuple[str, ...] = ()
    #: cleared before the killed run (so that the stage has per-case work to do and be killed in)
    fresh: tuple[str, ...] = ()
    #: what gets the SIGKILL: "stage" (its own process: ``kill -9 <pid>``, the out-of-memory killer;
    #: DVC lives on and fails) or "group" (DVC, the stage and its workers: a CI timeout, a lost machine)
    kill: str = "stage"


# No output measures the run (times, cache counts, where a fold resumed: MLflow's), so a rerun after a
# kill must reproduce every byte but the train stage's run ids.
STAGES = {
    "preprocess": Stage("preprocess", "data/.preprocessed.*/*_geometry.json"),
    "segment": Stage("segment", ".cache/segmentation/fold-*.pt", fresh=(".cache/segmentation",)),
    "extract": Stage("extract", ".cache/radiomics/*.json", fresh=(".cache/radiomics",)),
    "train": Stage("train", "models/*.skops", ignored=("metrics/train_runs.json",), kill="group"),
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING") and k != "MLFLOW_REGISTRY_URI"}
    return {**env, "PATH": f"{BIN}:{env.get('PATH', '')}", "BONEMET_PROGRESS": "0", "PYTHONUTF8": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1"}


def _dvc(work: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=work, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _outs(work: Path, stage: str) -> list[Path]:
    """The stage's outputs as dvc.yaml (templated from params.yaml) names them, its log excepted."""
    params = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
    outs = []
    for out in yaml.safe_load((work / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]["outs"]:
        name = next(iter(out)) if isinstance(out, dict) else out
        name = name.replace("${tracking.log_dir}", params["tracking"]["log_dir"])
        if not name.startswith(params["tracking"]["log_dir"] + "/"):
            outs.append(work / name)
    return outs


def _files(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
    return found


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _complete(path: Path) -> None:
    """Raise unless ``path`` is a whole file of its kind."""
    name = path.name
    if name.endswith(".json"):
        json.loads(path.read_text(encoding="utf-8"))
    elif name.endswith(".csv"):
        pd.read_csv(path)
    elif name.endswith(".parquet"):
        pd.read_parquet(path)
    elif name.endswith(".nii.gz"):
        import SimpleITK as sitk

        sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    elif name.endswith(".skops"):
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None, path
            json.loads(archive.read("schema.json"))
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    else:
        path.read_text(encoding="utf-8")


def _snapshot(work: Path, stage: Stage) -> dict[str, object]:
    """What a rerun must reproduce: each output file's bytes, or its parsed content."""
    snap: dict[str, object] = {}
    for path in _files(_outs(work, stage.name)):
        rel = path.relative_to(work).as_posix()
        if _hidden(path, work) or rel in stage.ignored:
            continue
        if rel.endswith(".parquet"):
            snap[rel] = pd.read_parquet(path)
        else:
            snap[rel] = path.read_bytes()
    return snap


def _assert_same(found: dict[str, object], expected: dict[str, object]) -> None:
    assert sorted(found) == sorted(expected)
    differ = []
    for rel, value in expected.items():
        if isinstance(value, pd.DataFrame):
            assert list(found[rel].columns) == list(value.columns), rel
            pd.testing.assert_frame_equal(found[rel], value, check_exact=True, obj=rel)
        elif found[rel] != value:
            differ.append(rel)
    assert not differ, f"differ from the uninterrupted run: {differ}"


def _running_runs(work: Path) -> list[tuple[str, str]]:
    db = work / "mlruns" / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return con.execute("select run_uuid, name from runs where status = 'RUNNING'").fetchall()


def _seconds(log: Path) -> float:
    """How long the stage ran, from the first and last time stamps of its log."""
    stamps = [line[:8] for line in log.read_text(encoding="utf-8").splitlines() if line[:2].isdigit()
              and line[2:3] == ":"]
    t0, t1 = (sum(int(x) * m for x, m in zip(s.split(":"), (3600, 60, 1), strict=True)) for s in (stamps[0], stamps[-1]))
    return float((t1 - t0) % 86400)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The uninterrupted run: validate to train on a tiny cohort; yields the work folder and the
    snapshots and durations of the four stages."""
    root = tmp_path_factory.mktemp("kill")
    settings = root / "radiomics_small.yaml"
    settings.write_text(yaml.safe_dump(RADIOMICS_SETTINGS), encoding="utf-8")
    extra = root / "extra.yaml"
    extra.write_text(yaml.safe_dump({**OVERRIDES, "radiomics": {**OVERRIDES["radiomics"],
                                                                "settings_file": str(settings)}}), encoding="utf-8")
    work = root / "work"
    proc = subprocess.run(["bash", str(REPO / "ci" / "smoke.sh"), str(work), str(extra)], capture_output=True,
                          text=True, timeout=900, env={**_env(), "SMOKE_DAG_ONLY": "1", "SMOKE_TARGET": "train"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    snaps = {name: _snapshot(work, stage) for name, stage in STAGES.items()}
    seconds = {name: _seconds(work / "logs" / f"{name}.log") for name in STAGES}
    assert not _running_runs(work)
    return work, snaps, seconds


def _processes_in(work: Path) -> dict[int, tuple[int, str]]:
    """The live processes whose working folder is ``work``: pid -> (parent pid, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) != work:
                continue
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] in ("Z", "X"):  # a zombie is dead, only not yet reaped
                continue
            found[int(entry.name)] = (int(fields[1]), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue  # ended meanwhile, or not ours to read
    return found


def _stage_process(work: Path, name: str) -> int | None:
    """The pid of ``bonemet <name>`` (DVC's child; not one of the workers it forked), if running."""
    procs = _processes_in(work)
    for pid, (ppid, cmd) in procs.items():
        if f"bin/bonemet {name}" in cmd and "bin/bonemet" not in procs.get(ppid, (0, ""))[1]:
            return pid
    return None


def _written_since(work: Path, pattern: str, since: float) -> bool:
    for path in work.glob(pattern):
        try:
            if path.stat().st_mtime >= since:
                return True
        except FileNotFoundError:  # a temporary renamed meanwhile
            continue
    return False


def _kill_at_random_moment(work: Path, stage: Stage, rng: random.Random, expected_s: float) -> float:
    """Start ``dvc repro -f -s stage``; once ``stage.started`` is written, wait a random part of
    the time left, then SIGKILL ``stage.kill``: the stage's own process (DVC sees it die) or DVC's
    whole process group. Returns the seconds from start to kill. A run that ends before its
    moment (a less loaded machine than the reference run's) is started again and killed as soon
    as it has written ``stage.started``."""
    for fraction in (rng.uniform(0.0, 0.8), 0.0):
        at = _start_and_kill(work, stage, fraction, expected_s)
        if at is not None:
            return at
    pytest.fail(f"{stage.name} finished twice before it could be killed")


def _start_and_kill(work: Path, stage: Stage, fraction: float, expected_s: float) -> float | None:
    for path in stage.fresh:
        shutil.rmtree(work / path, ignore_errors=True)
    since, start = time.time() - 1.0, time.monotonic()  # (file times have a coarser clock)
    log = work.parent / f"killed-{stage.name}.log"  # a file, not a pipe: a surviving worker would hold it open
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([str(BIN / "dvc"), "repro", "-f", "-s", stage.name], cwd=work, env=_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not _written_since(work, stage.started, since):
            assert proc.poll() is None, f"{stage.name} ended before writing {stage.started}:\n" + log.read_text()[-4000:]
            assert time.monotonic() - start < 600, f"{stage.name}: {stage.started} never appeared"
            time.sleep(0.05)
        time.sleep(fraction * max(0.5, expected_s - (time.monotonic() - start)))
        target = _stage_process(work, stage.name)
        if target is None:  # done already
            assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
            return None
        at = time.monotonic() - start
        try:
            if stage.kill == "stage":
                os.kill(target, signal.SIGKILL)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended in between
            assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
            return None
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    out = log.read_text(encoding="utf-8")
    if stage.kill == "stage":  # DVC saw its stage die and says so
        assert proc.returncode != 0 and f"failed to reproduce '{stage.name}'" in out, out[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    # the stage's worker processes died with it: none goes on writing next to the rerun
    deadline = time.monotonic() + 20
    while (left := _processes_in(work)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # end them (ours) before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{stage.name} killed after {at:.1f} s left processes running: {left}"
    return at


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_killed_at_a_random_moment_reruns_to_the_same_outputs(pipeline, name):
    work, snaps, seconds = pipeline
    stage = STAGES[name]
    seed = int(os.environ.get("BONEMET_KILL_SEED", "0"))
    rng = random.Random(f"{name}-{seed}")
    at = _kill_at_random_moment(work, stage, rng, seconds[name] + 3.0)  # + DVC's own start

    # nothing half-written: each output file is complete, anything else is a hidden temporary
    outs = _outs(work, name)
    for path in _files(outs):
        if not _hidden(path, work):
            try:
                _complete(path)
            except Exception as exc:
                raise AssertionError(f"{name} killed after {at:.1f} s left a broken output {path}") from exc
    if name == "extract":  # every cache entry the killed run left verifies (or the rerun could not trust it)
        from bonemet.radiomics.extraction import _read_cache

        entries = [p for p in (work / ".cache" / "radiomics").glob("*.json") if not p.name.startswith(".")]
        assert all(_read_cache(p) is not None for p in entries), entries

    # `dvc repro` completes, with the uninterrupted run's outputs. Forced: every output is cached and the
    # lock still names the uninterrupted run's, so a plain `dvc repro` checks them out of the cache (what a
    # user gets, and right); here the stage itself must recompute them after the kill (resuming its work)
    proc = _dvc(work, "repro", "-f", "-s", name)
    assert proc.returncode == 0, f"rerun after a kill at {at:.1f} s:\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"Running stage '{name}'" in proc.stdout, proc.stdout[-2000:]
    _assert_same(_snapshot(work, stage), snaps[name])
    assert not _running_runs(work), "a run the killed stage opened is still RUNNING"
    # and no temporary output folder of the killed run is left (a whole cohort, for preprocess)
    leftovers = [p for out in outs if out.is_dir() for p in out.parent.glob(f".{out.name}.*")]
    assert not leftovers, leftovers
    print(f"{name}: killed {at:.1f} s after its start (reference run {seconds[name]:.0f} s); rerun identical")
