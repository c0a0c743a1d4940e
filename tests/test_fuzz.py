"""Bad input, tried systematically (issue 18): property-based tests of the manifest and image
readers, and the input-class catalogue of benchmarks/fuzz.py in its quick mode."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonemet.data.io import ImageReadError, read_image
from bonemet.data.manifest import CASE_ID_PATTERN, MAX_ID_LENGTH, ManifestError, read_manifest

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write(folder: Path, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.csv").write_bytes(data)
    return folder


@FAST
@given(st.binary(max_size=3000))
def test_any_bytes_as_a_manifest_give_cases_or_a_manifest_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            read_manifest(_write(Path(tmp), data))
        except ManifestError:
            pass


CELL = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
PATH = st.one_of(CELL, st.sampled_from(["images/a.nii.gz", "../x.nii.gz", "/etc/passwd", "a/../../b", "."]))


@FAST
@given(st.lists(st.tuples(CELL, st.sampled_from(["0", "1", "2", ""]), PATH, PATH), min_size=1, max_size=6))
def test_manifests_of_random_rows_give_safe_cases_or_a_manifest_error(rows):
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case_id", "label", "image", "mask"])
    writer.writerows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        try:
            cases = read_manifest(_write(cohort, buffer.getvalue().encode("utf-8")))
        except ManifestError:
            return
        root = cohort.resolve()
        for case in cases:  # whatever is accepted names files safely and stays in the cohort
            assert re.match(CASE_ID_PATTERN, case.case_id) and len(case.case_id) <= MAX_ID_LENGTH
            for path in (case.image, case.manual_mask):
                path.resolve().relative_to(root)


@FAST
@given(st.binary(max_size=4000), st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha", ".dcm", ".bin"]))
def test_any_bytes_as_an_image_give_an_image_read_error(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(data)
        try:
            image = read_image(path)
        except ImageReadError:
            return
        assert image.GetDimension() == 3  # the rare bytes that make a valid tiny image are a 3D one


def test_every_input_class_gives_a_clear_error_and_writes_nothing_outside(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fuzz.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["n_classes"] >= 30
    assert (summary["tracebacks"], summary["writes_outside"], summary["accepted_when_they_should_not_be"]) == (0, 0, 0)
    assert set(summary["by_target"]) >= {"manifest", "image", "mask", "cli"}
