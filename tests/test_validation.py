"""Cohort validation (issue 2, sections 4 and 7): GX rules, bad cohorts, the `validate` command."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from bonemet.cli import main
from bonemet.validation.gx import Rule, RuleError, check_table


# --------------------------------------------------------------------------- gx.check_table
def test_check_table_names_failing_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # GX must not write a project folder into the working directory

    def no_network(*args, **kwargs):
        raise AssertionError("great_expectations tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    df = pd.DataFrame(
        {"case_id": ["a", "b", "c", "c"], "x": [1.0, 5.0, None, 2.0], "label": ["0", "1", "2", "1"]}
    )
    rules = [
        Rule("x_range", "ExpectColumnValuesToBeBetween", {"column": "x", "min_value": 0, "max_value": 2}),
        Rule("unique_id", "ExpectColumnValuesToBeUnique", {"column": "case_id"}),
        Rule("x_present", "ExpectColumnValuesToNotBeNull", {"column": "x"}, severity="soft"),
        Rule("label_set", "ExpectColumnValuesToBeInSet", {"column": "label", "value_set": ["0", "1"]}),
        Rule("no_column", "ExpectColumnValuesToNotBeNull", {"column": "missing"}),
        Rule(
            "columns",
            "ExpectTableColumnsToMatchSet",
            {"column_set": ["case_id", "x", "y"], "exact_match": False},
        ),
        Rule("rows", "ExpectTableRowCountToBeBetween", {"min_value": 1, "max_value": 10}),
    ]
    results = {r.rule: r for r in check_table(df, rules)}
    assert list(results) == [r.name for r in rules]
    assert results["x_range"].failing_ids == ["b"] and results["x_range"].unexpected == {"b": 5.0}
    assert not results["x_range"].success and results["x_range"].severity == "hard"
    assert results["unique_id"].failing_ids == ["c"]
    assert results["x_present"].failing_ids == ["c"] and results["x_present"].severity == "soft"
    assert results["label_set"].failing_ids == ["c"] and results["label_set"].unexpected["c"] == "2"
    assert not results["no_column"].success and "missing" in results["no_column"].detail
    assert not results["columns"].success and "y" in results["columns"].detail
    assert results["rows"].success and results["rows"].failing_ids == []
    assert list(tmp_path.iterdir()) == []
    assert df.shape == (4, 3)  # input untouched


def test_check_table_without_id_column_uses_row_index_and_passes_clean_data():
    df = pd.DataFrame({"x": [0.5, 3.0]})
    (res,) = check_table(df, [Rule("x", "ExpectColumnValuesToBeBetween", {"column": "x", "max_value": 1})])
    assert res.failing_ids == ["1"]
    (ok,) = check_table(df, [Rule("x", "ExpectColumnValuesToBeBetween", {"column": "x", "max_value": 9})])
    assert ok.success and ok.failing_ids == []


@pytest.mark.parametrize(
    "rules",
    [
        [Rule("a", "ExpectNoSuchThing", {})],
        [Rule("a", "ExpectColumnValuesToBeBetween", {"column": "x"}, severity="fatal")],
        [Rule("a", "ExpectColumnValuesToNotBeNull", {"column": "x"})] * 2,
    ],
)
def test_check_table_rejects_malformed_rules(rules):
    with pytest.raises(RuleError):
        check_table(pd.DataFrame({"x": [1]}), rules)


# --------------------------------------------------------------------------- tiny cohorts
SIZE = 24
#: over the repository's params: the tiny test lesions (~0.05 mL) sit inside the plausible range
PARAMS = {"data": {"mask_label": 1}, "validate": {"lesion_volume_ml": [0.01, 200.0]}}


def _ct(rng: np.random.Generator, spacing=(0.8, 0.8, 2.0)) -> sitk.Image:
    """A 24^3 int16 CT-like volume: air around a soft-tissue body holding a bright bone block."""
    z, y, x = np.mgrid[:SIZE, :SIZE, :SIZE]
    arr = np.full((SIZE, SIZE, SIZE), -1000.0)
    body = (y - 12) ** 2 + (x - 12) ** 2 < 10**2
    arr[body] = 40.0
    arr[body & (abs(y - 12) < 5) & (abs(x - 12) < 5)] = 700.0
    arr += rng.normal(0, 15, arr.shape)
    image = sitk.GetImageFromArray(np.clip(arr, -1024, 3071).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, -10.0, -24.0))
    return image


def _sphere_mask(image: sitk.Image, radius: float = 3.5, value: int = 1) -> sitk.Image:
    z, y, x = np.mgrid[:SIZE, :SIZE, :SIZE]
    arr = (((z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) < radius**2).astype(np.uint8) * value
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(image)
    return mask


def make_cohort(root: Path, n: int = 4, annotator: bool = True) -> Path:
    """Write a clean tiny cohort (n cases, alternating labels) and return its folder."""
    rng = np.random.default_rng(0)
    cohort = root / "cohort"
    lines = ["case_id,label,image,mask" + (",annotator_mask" if annotator else "") + ",site"]
    for i in range(n):
        cid = f"c{i:02d}"
        image = _ct(rng)
        for sub, img in (
            ("images", image),
            ("masks", _sphere_mask(image)),
            ("annotator_masks", _sphere_mask(image, 4)),
        ):
            if sub == "annotator_masks" and not annotator:
                continue
            (cohort / sub).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(cohort / sub / f"{cid}.nii.gz"), useCompression=True)
        row = f"{cid},{i % 2},images/{cid}.nii.gz,masks/{cid}.nii.gz"
        lines.append(row + (f",annotator_masks/{cid}.nii.gz" if annotator else "") + ",A")
    (cohort / "manifest.csv").write_text("\n".join(lines) + "\n")
    return cohort


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def validate(tmp_path, caplog, params_file):
    """``(cohort, overrides=PARAMS) -> (exit code, report.json, error lines, report.txt)`` of
    ``bonemet validate COHORT --report DIR`` with the repository's params plus ``overrides``."""

    def run(cohort: Path, overrides: dict = PARAMS) -> tuple[int, dict, str, str]:
        return _validate(tmp_path, cohort, caplog, params_file(overrides))

    return run


def _validate(tmp_path: Path, cohort: Path, caplog, params: Path) -> tuple[int, dict, str, str]:
    report_dir = tmp_path / "report"
    before = _snapshot(cohort)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(
            ["validate", str(cohort), "--report", str(report_dir), "--params", str(params), "--no-progress"]
        )
    assert _snapshot(cohort) == before, "the cohort folder was modified"
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    report = json.loads((report_dir / "report.json").read_text())
    return code, report, errors, (report_dir / "report.txt").read_text()


def test_clean_cohort_passes(tmp_path, caplog, validate):
    cohort = make_cohort(tmp_path)
    code, report, errors, text = validate(cohort)
    assert code == 0, text
    assert report["passed"] and report["n_cases"] == 4 and report["cases"] == {}
    assert errors == ""
    assert "PASSED" in text and "rules checked" in text and "hu_air_or_fat [hard]: ok" in text
    m = report["measurements"][0]
    assert m["image_3d"] and m["mask_grid_ok"] and m["mask_label_voxels"] > 0
    assert m["hu_min"] <= -900 and m["hu_max"] >= 600
    assert m["spacing_min_mm"] == pytest.approx(0.8)
    assert m["mask_volume_ml"] == pytest.approx(m["mask_label_voxels"] * 0.8 * 0.8 * 2.0 / 1000)


def _rewrite_manifest(cohort: Path, fn) -> None:
    path = cohort / "manifest.csv"
    path.write_text(fn(path.read_text()))


def _write(cohort: Path, rel: str, image: sitk.Image) -> None:
    sitk.WriteImage(image, str(cohort / rel), useCompression=True)


def _break_missing(cohort):
    (cohort / "images" / "c01.nii.gz").unlink()
    return "c01", "image_exists", "file not found"


def _break_truncated(cohort):
    path = cohort / "images" / "c02.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "c02", "image_readable", "c02.nii.gz"


def _break_grid(cohort):
    image = sitk.ReadImage(str(cohort / "images" / "c03.nii.gz"))
    other = sitk.Image([SIZE, SIZE, SIZE - 4], sitk.sitkUInt8)
    other.SetSpacing(image.GetSpacing())
    other.SetOrigin(image.GetOrigin())
    other[12, 12, 10] = 1
    _write(cohort, "masks/c03.nii.gz", other)
    return "c03", "mask_grid", "size"


def _break_spacing(cohort):
    mask = sitk.ReadImage(str(cohort / "masks" / "c03.nii.gz"))
    mask.SetSpacing((1.0, 1.0, 1.0))
    _write(cohort, "masks/c03.nii.gz", mask)
    return "c03", "mask_grid", "spacing"


def _break_empty_mask(cohort):
    mask = sitk.ReadImage(str(cohort / "masks" / "c00.nii.gz")) * 0
    _write(cohort, "masks/c00.nii.gz", mask)
    return "c00", "mask_nonempty", "empty"


def _break_wrong_label_value(cohort):
    mask = sitk.ReadImage(str(cohort / "masks" / "c00.nii.gz")) * 2
    _write(cohort, "masks/c00.nii.gz", mask)
    return "c00", "mask_nonempty", "other values 2"


def _break_label_2(cohort):
    _rewrite_manifest(cohort, lambda t: t.replace("c02,0,", "c02,2,"))
    return "c02", "label_valid", "label '2'"


def _break_duplicate(cohort):
    _rewrite_manifest(cohort, lambda t: t.replace("c03,1,", "c01,1,"))
    return "c01", "case_id_unique", "2 rows"


def _break_mr(cohort):
    rng = np.random.default_rng(1)
    arr = rng.uniform(0, 800, (SIZE, SIZE, SIZE)).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(sitk.ReadImage(str(cohort / "images" / "c01.nii.gz")))
    _write(cohort, "images/c01.nii.gz", image)
    return "c01", "hu_air_or_fat", "MR-like"


def _break_float_mask(cohort):
    mask = sitk.Cast(sitk.ReadImage(str(cohort / "masks" / "c01.nii.gz")), sitk.sitkFloat32) * 0.5
    _write(cohort, "masks/c01.nii.gz", mask)
    return "c01", "mask_readable", "non-integer"


def _break_annotator(cohort):
    (cohort / "annotator_masks" / "c02.nii.gz").write_bytes(b"not a nifti file at all")
    return "c02", "annotator_mask_readable", "c02"


@pytest.mark.parametrize(
    "breaker",
    [
        _break_missing,
        _break_truncated,
        _break_grid,
        _break_spacing,
        _break_empty_mask,
        _break_wrong_label_value,
        _break_label_2,
        _break_duplicate,
        _break_mr,
        _break_float_mask,
        _break_annotator,
    ],
)
def test_bad_cohort_fails_naming_case_and_rule(tmp_path, caplog, breaker, validate):
    cohort = make_cohort(tmp_path)
    case, rule, hint = breaker(cohort)
    code, report, errors, text = validate(cohort)
    assert code == 1
    assert not report["passed"]
    assert f"case '{case}'" in errors and rule in errors and hint in errors, errors
    broken = {f["rule"]: f for f in report["cases"][case]}
    assert broken[rule]["severity"] == "hard" and hint in broken[rule]["detail"]
    assert f"case '{case}':" in text and rule in text
    # only the broken case fails (a duplicate id breaks the two rows sharing it)
    assert report["n_cases_failed"] == 1


def test_one_class_only_fails_at_manifest_level(tmp_path, caplog, validate):
    cohort = make_cohort(tmp_path)
    _rewrite_manifest(cohort, lambda t: t.replace(",1,images", ",0,images"))
    code, report, errors, text = validate(cohort)
    assert code == 1
    assert [f["rule"] for f in report["manifest_failures"]] == ["both_classes"]
    assert "both_classes" in errors and "['0']" in errors


def test_several_bad_cases_are_all_named(tmp_path, caplog, validate):
    cohort = make_cohort(tmp_path, n=5)
    _break_missing(cohort)
    _break_empty_mask(cohort)
    _break_truncated(cohort)
    code, report, errors, _ = validate(cohort)
    assert code == 1 and report["n_cases_failed"] == 3
    for case in ("c00", "c01", "c02"):
        assert f"case '{case}'" in errors
    assert "c03" not in errors and "c04" not in errors


def test_soft_rules_only_warn(tmp_path, caplog, validate):
    cohort = make_cohort(tmp_path, annotator=False)
    mask = _sphere_mask(sitk.ReadImage(str(cohort / "images" / "c00.nii.gz")))
    mask[0, 0, 0] = 3  # a stray voxel of another label: warn, the lesion is still label 1
    _write(cohort, "masks/c00.nii.gz", mask)
    code, report, errors, text = validate(cohort)
    assert code == 0 and report["passed"]
    assert [f["rule"] for f in report["cases"]["c00"]] == ["mask_binary"]
    assert report["cases"]["c00"][0]["severity"] == "soft" and "3" in report["cases"]["c00"][0]["detail"]
    assert any(r.levelno == logging.WARNING and "c00" in r.getMessage() for r in caplog.records)
    assert "annotator" not in json.dumps(report["cases"])
    # lesion volume below the range: soft too (every tiny lesion is 'too small' here)
    small = {**PARAMS, "validate": {"lesion_volume_ml": [0.5, 200.0]}}
    code, report, errors, _ = validate(cohort, small)
    assert code == 0 and all("mask_volume" in {f["rule"] for f in fs} for fs in report["cases"].values())


def test_missing_manifest_and_missing_columns(tmp_path, caplog, validate):
    cohort = make_cohort(tmp_path)
    _rewrite_manifest(cohort, lambda t: t.replace("case_id,label,image,mask", "case,label,image,mask"))
    code, report, errors, _ = validate(cohort)
    assert code == 1 and report["manifest_failures"][0]["rule"] == "manifest_readable"
    assert "case_id" in errors
    (cohort / "manifest.csv").unlink()
    code, report, errors, _ = validate(cohort)
    assert code == 1 and "manifest not found" in errors


def test_without_report_nothing_is_written(tmp_path, caplog, params_file, monkeypatch):
    cohort = make_cohort(tmp_path)
    params = params_file(PARAMS)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the pipeline's data/validation would be created here
    before = _snapshot(tmp_path)
    with caplog.at_level(logging.INFO):
        assert main(["validate", str(cohort), "--params", str(params), "--no-progress"]) == 0
    assert _snapshot(tmp_path) == before
    assert "PASSED" in caplog.text and "report written" not in caplog.text


def test_validate_cohort_uses_the_spec_and_mask_label(tmp_path, params):
    from bonemet.validation.cohort import validate_cohort

    cohort = make_cohort(tmp_path, annotator=False)
    for i in range(4):  # lesions stored as label 2 (data.mask_label: 2)
        path = cohort / "masks" / f"c{i:02d}.nii.gz"
        _write(cohort, f"masks/c{i:02d}.nii.gz", sitk.ReadImage(str(path)) * 2)
    spec = params.validation.updated({"lesion_volume_ml": [0.01, 200.0]})
    report = validate_cohort(cohort, spec, mask_label=2, roi=None, seg_segment=None, pseudonym_key=None, show_progress=False)
    assert report.passed and report.failures == {}
    assert (report.measurements["mask_label_voxels"] > 0).all()
    report = validate_cohort(cohort, spec, mask_label=1, roi=None, seg_segment=None, pseudonym_key=None, show_progress=False)
    assert not report.passed and {f.rule for f in report.failures["c00"]} >= {"mask_nonempty"}
    # the spec's rules are the ones applied: a spacing ceiling below the 2 mm slices fails every case
    strict = spec.updated({"max_spacing_mm": 1.5})
    report = validate_cohort(cohort, strict, mask_label=2, roi=None, seg_segment=None, pseudonym_key=None, show_progress=False)
    assert not report.passed and sorted(report.bad_cases) == ["c00", "c01", "c02", "c03"]
    assert all("spacing_max" in {f.rule for f in report.failures[c]} for c in report.bad_cases)


def test_paths_leading_out_of_the_cohort_are_listed_and_never_read(tmp_path, params):
    import numpy as np
    import SimpleITK as sitk

    from bonemet.validation.cohort import validate_cohort

    outside = tmp_path / "outside"
    outside.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)), str(outside / "ct.nii.gz"))
    cohort = tmp_path / "cohort"
    (cohort / "images").mkdir(parents=True)
    (cohort / "images" / "link.nii.gz").symlink_to(outside / "ct.nii.gz")
    (cohort / "manifest.csv").write_text(
        "case_id,label,image,mask\n"
        "a,1,../outside/ct.nii.gz,m.nii.gz\n"
        f"b,0,{outside / 'ct.nii.gz'},m.nii.gz\n"
        "c,1,images/link.nii.gz,m.nii.gz\n"
    )
    report = validate_cohort(cohort, params.validation, mask_label=1, roi=None, seg_segment=None, pseudonym_key=None,
                             show_progress=False)
    for cid in ("a", "b", "c"):
        rules = {f.rule: f.detail for f in report.failures[cid]}
        assert "points outside the cohort folder" in rules["paths_inside_cohort"], rules
    # the files outside were not read: no measurement of them
    assert report.measurements["image_readable"].isna().all() or not report.measurements["image_readable"].any()
