"""Patient privacy: pseudonymous ids, and no identifying DICOM value in any output of a whole run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bonemet.data.pseudonym import MIN_KEY_BYTES, PseudonymKeyError, check_key, pseudonym

REPO = Path(__file__).resolve().parents[1]
KEY = "k3y-for-the-privacy-test-0123456789abcdef"


def test_pseudonyms_are_keyed_stable_and_short():
    a = pseudonym("case_000", b"x" * 16)
    assert a == pseudonym("case_000", b"x" * 16) and a.startswith("p") and len(a) == 17
    assert a != pseudonym("case_000", b"y" * 16)  # another key, another pseudonym
    assert a != pseudonym("case_001", b"x" * 16)
    assert "case" not in a
    with pytest.raises(PseudonymKeyError, match=f"at least {MIN_KEY_BYTES}"):
        check_key(b"short", "$BONEMET_PSEUDONYM_KEY")


def _manifest(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.csv").write_text(
        "case_id,label,image,mask,patient_id,notes\n"
        "MRN-0001-a,1,img/a.nii.gz,m/a.nii.gz,MRN-0001,Mrs Smith\n"
        "MRN-0001-b,0,img/b.nii.gz,m/b.nii.gz,MRN-0001,Mrs Smith\n"
    )


def test_the_manifest_reader_pseudonymises_case_and_patient_ids_and_drops_free_text(tmp_path):
    from bonemet.data.manifest import read_manifest

    _manifest(tmp_path)
    key = KEY.encode()
    plain = read_manifest(tmp_path)
    assert [c.case_id for c in plain] == ["MRN-0001-a", "MRN-0001-b"] and plain[0].metadata == {"notes": "Mrs Smith"}
    cases = read_manifest(tmp_path, pseudonym_key=key)
    assert [c.case_id for c in cases] == [pseudonym("MRN-0001-a", key), pseudonym("MRN-0001-b", key)]
    assert {c.patient_id for c in cases} == {pseudonym("MRN-0001", key)}  # still one patient
    assert all(c.metadata == {} for c in cases)  # free-text columns may identify: not carried
    assert cases[0].image == tmp_path / "img/a.nii.gz"  # the files are found as before


def _params(tmp_path: Path, **data) -> Path:
    from bonemet.config import deep_merge, load_params

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(load_params(REPO / "params.yaml"), {"data": data})))
    return path


def _bonemet(args, env_key=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "BONEMET_PSEUDONYM_KEY"}
    if env_key is not None:
        env["BONEMET_PSEUDONYM_KEY"] = env_key
    return subprocess.run([sys.executable, "-m", "bonemet", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_the_key_is_required_and_maps_pseudonyms_back(tmp_path):
    _manifest(tmp_path / "cohort")
    params = _params(tmp_path, cohort_dir=str(tmp_path / "cohort"), pseudonymize=True)
    proc = _bonemet(["split", "--params", str(params)])
    assert proc.returncode == 1 and "$BONEMET_PSEUDONYM_KEY is not set" in proc.stderr and "Traceback" not in proc.stderr
    proc = _bonemet(["pseudonyms", "--params", str(params), "--json"], env_key=KEY)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {(r["kind"], r["id"]) for r in rows} == {("case", "MRN-0001-a"), ("case", "MRN-0001-b"), ("patient", "MRN-0001")}
    wanted = pseudonym("MRN-0001-b", KEY.encode())
    proc = _bonemet(["pseudonyms", "--params", str(params), "--lookup", wanted], env_key=KEY)
    assert proc.returncode == 0 and "MRN-0001-b" in proc.stdout and "MRN-0001-a" not in proc.stdout
    # with another key the pseudonym belongs to no case of the cohort
    proc = _bonemet(["pseudonyms", "--params", str(params), "--lookup", wanted], env_key="another-key-0123456789")
    assert proc.returncode == 1 and "no id of this cohort" in proc.stderr


#: Identifying values written into the DICOM headers of every series (and the manifest's patient ids).
IDENTITY = {
    "PatientName": "Quixote^Alonso^Q",
    "PatientBirthDate": "19430817",
    "InstitutionName": "Hospital San Zenon de Cuenca",
    "AccessionNumber": "ACCZ998877",
    "ReferringPhysicianName": "Sancho^Panza",
    "StudyDate": "20190311",
    "StudyID": "STZ4455",
}


def _identity(index: int) -> dict[str, str]:
    return {**IDENTITY, "PatientID": f"MRNZ{731000 + index}", "OtherPatientIDs": f"OTHZ{52000 + index}"}


def _dicom_cohort(folder: Path, n: int) -> list[str]:
    """A tiny synthetic cohort as a hospital would export it: DICOM CT series with identifying
    headers, RTSTRUCT masks, case ids made from the medical record number. Returns the values to hunt."""
    import SimpleITK as sitk

    from bonemet.data.dicom_masks import write_rtstruct
    from bonemet.data.dicom_series import write_dicom_series
    from bonemet.data.io import read_image, read_mask
    from bonemet.data.manifest import read_manifest
    from bonemet.data.synthetic import generate_cohort

    nifti = folder.parent / "nifti"
    generate_cohort(nifti, n_cases=n, n_positive=n // 2, seed=11, size="small", mask_label=1, show_progress=False)
    rows, secrets = [], set()
    for i, case in enumerate(read_manifest(nifti)):
        identity = _identity(i)
        case_id = f"{identity['PatientID']}-L1"
        image = sitk.Cast(read_image(case.image), sitk.sitkInt16)
        write_dicom_series(image, folder / "images" / case_id, patient=identity)
        mask = read_mask(case.manual_mask, label=1)
        write_rtstruct(mask, folder / "images" / case_id, folder / "masks" / f"{case_id}.dcm", "lesion",
                       algorithm_type="MANUAL", grid_tolerance_mm=0.01)
        rows.append(f"{case_id},{case.label},images/{case_id},masks/{case_id}.dcm,{identity['PatientID']}")
        secrets |= {case_id, *identity.values()}
    (folder / "manifest.csv").write_text("case_id,label,image,mask,patient_id\n" + "\n".join(rows) + "\n")
    # person names are searched whole and by component (Quixote^Alonso -> Quixote, Alonso)
    secrets |= {part for value in IDENTITY.values() for part in value.split("^") if len(part) >= 5}
    return sorted(secrets)


def _outputs(work: Path, cohort: Path) -> list[Path]:
    """Every file a run wrote: the DAG's outputs, caches, the MLflow store, dvc.lock; not the cohort
    itself, DVC's copy of it (.dvc/cache) or git's metadata."""
    skip = [cohort, work / ".dvc", work / ".git", work / "src", work / "nifti"]
    return [p for p in work.rglob("*") if p.is_file() and not any(p.is_relative_to(s) for s in skip)]


def _whole(secret: str, encoding: str) -> re.Pattern:
    """``secret`` in ``encoding`` as bytes, not as a run of digits inside a longer number: a birth date
    19430817 inside the object id 140171943081752 that skops writes (thousands per model file,
    different every run) is no leak, the date beside a letter or a separator is."""
    digit = b"[0-9]" if encoding == "utf-8" else b"[0-9]\x00"
    before = b"(?<!" + digit + b")" if secret[0].isdigit() else b""
    after = b"(?!" + digit + b")" if secret[-1].isdigit() else b""
    return re.compile(before + re.escape(secret.encode(encoding)) + after)


def test_whole_values_are_found_and_digits_inside_longer_numbers_are_not():
    for encoding in ("utf-8", "utf-16-le"):
        date = _whole("19430817", encoding)
        assert date.search('"born": "19430817"'.encode(encoding)) and date.search("x19430817-y".encode(encoding))
        assert not date.search('"__id__": 140171943081752'.encode(encoding))
        assert _whole("MRNZ731000", encoding).search("MRNZ731000-L1".encode(encoding))
        assert not _whole("MRNZ731000", encoding).search("MRNZ7310001".encode(encoding))


@pytest.mark.slow
def test_no_identifying_value_reaches_any_output(tmp_path):
    """A DICOM cohort with identifying headers through validate, preprocess, segment, extract, train,
    evaluate, register, report and predict, with pseudonymisation on: no output byte carries a
    name, birth date, id, institution, accession number, physician or date from the headers, or
    the manifest's own case and patient ids."""
    work = tmp_path / "run"
    cohort = work / "cohorts" / "hospital"
    secrets = _dicom_cohort(cohort, n=24)
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"data": {"source": "user", "cohort_dir": "cohorts/hospital", "roi": "lesion",
                                              "mask_label": 1, "pseudonymize": True}}))
    env = dict(os.environ, BONEMET_PSEUDONYM_KEY=KEY, SMOKE_DAG_ONLY="1", PYTHONUTF8="1")
    run = subprocess.run(["bash", str(REPO / "ci" / "smoke.sh"), str(work), str(extra)], capture_output=True,
                         encoding="utf-8", errors="replace", env=env, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    # predict one CT (as a copy under a neutral name: the path a user types is echoed in the answer)
    import shutil

    first = sorted((cohort / "images").iterdir())[0]
    shutil.copytree(first, tmp_path / "ct_series")
    predicted = subprocess.run([str(REPO / ".venv" / "bin" / "bonemet"), "predict", str(tmp_path / "ct_series"),
                                "--save-mask", str(work / "predicted_mask.nii.gz")], capture_output=True,
                               encoding="utf-8", errors="replace", env=env, cwd=work, timeout=600)
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    (work / "logs").mkdir(exist_ok=True)  # beside the stages' own logs (tracking.log_dir)
    for name, text in (("smoke.log", run.stdout + run.stderr), ("predict.log", predicted.stdout + predicted.stderr)):
        (work / "logs" / name).write_text(text, encoding="utf-8")
    files = _outputs(work, cohort)
    expected = ["dvc.lock", "data/plan.json", "metrics/summary.json", "metrics/repeated.json", "reports/index.html",
                "data/features/auto.parquet", "data/splits.json", "models/index.json", "mlruns/mlflow.db"]
    for out in expected:
        assert work / out in files, out
    found = []
    patterns = [(secret, encoding, _whole(secret, encoding)) for secret in secrets for encoding in ("utf-8", "utf-16-le")]
    for path in files:
        data = path.read_bytes()
        for secret, encoding, pattern in patterns:
            if pattern.search(data):
                found.append(f"{path.relative_to(work)}: {secret!r} ({encoding})")
    assert found == [], "\n".join(found[:20])
    assert pseudonym(f"{_identity(0)['PatientID']}-L1", KEY.encode()) in (work / "data" / "splits.json").read_text()
