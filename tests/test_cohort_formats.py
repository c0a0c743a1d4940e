"""A cohort in the formats radiologists export: DICOM series CTs with RTSTRUCT and DICOM SEG masks,
read through the manifest's roi / segment columns by validation, preprocessing and extraction; bad
DICOM masks listed by validation with the reader's message; the manifest's optional columns.

Every file is made here from a small synthetic cohort (4 cases of ~32^3 voxels).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from bonemet.data.dicom_masks import write_rtstruct, write_seg
from bonemet.data.dicom_series import write_dicom_series
from bonemet.data.io import read_image, read_mask, write_image
from bonemet.data.manifest import ManifestError, read_manifest
from bonemet.data.synthetic import generate_cohort
from bonemet.tracking import RecordingTracker
from compute_specs import LOCAL_COMPUTE

TOL = 0.01
FAST = {
    "imageType": {"Original": {}},
    "featureClass": {"shape": [], "firstorder": []},
    "setting": {"binWidth": 25, "resampledPixelSpacing": None, "label": 1},
}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


class Cohort:
    """A synthetic NIfTI cohort and its DICOM twin: CT series, RTSTRUCT for cases 0-1, SEG for 2-3."""

    def __init__(self, root: Path):
        self.nifti = root / "nifti"
        generate_cohort(self.nifti, n_cases=4, n_positive=2, seed=11, size="small", mask_label=1, overwrite=True,
                        show_progress=False)
        self.dicom = root / "dicom"
        self.cases = read_manifest(self.nifti)
        rows = []
        for i, case in enumerate(self.cases):
            cid = case.case_id
            series = self.dicom / "images" / cid
            write_dicom_series(read_image(case.image), series)
            ct = read_image(series)
            mask = read_mask(case.manual_mask, label=1)
            mask.CopyInformation(ct)
            (self.dicom / "masks").mkdir(parents=True, exist_ok=True)
            row = {"case_id": cid, "label": case.label, "image": f"images/{cid}", "roi": "", "segment": "",
                   "annotator_mask": f"annotator/{cid}.nii.gz"}
            if i < 2:  # RTSTRUCT: case 0 names its ROI, case 1 relies on params data.roi ("lesion")
                name = "GTV bone met" if i == 0 else "lesion"
                write_rtstruct(mask, series, self.dicom / "masks" / f"{cid}_rs.dcm", name, algorithm_type="MANUAL",
                               grid_tolerance_mm=TOL)
                row.update(mask=f"masks/{cid}_rs.dcm", roi="GTV bone met" if i == 0 else "")
            else:  # SEG: by number, then by label
                write_seg(mask, series, self.dicom / "masks" / f"{cid}_seg.dcm", algorithm_type="MANUAL",
                          grid_tolerance_mm=TOL, segment_label="metastasis")
                row.update(mask=f"masks/{cid}_seg.dcm", segment="1" if i == 2 else "metastasis")
            annotator = read_mask(case.annotator_mask, label=1)
            annotator.CopyInformation(ct)
            write_image(sitk.Cast(annotator, sitk.sitkUInt8), self.dicom / row["annotator_mask"])
            rows.append(row)
        pd.DataFrame(rows).to_csv(self.dicom / "manifest.csv", index=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    return Cohort(tmp_path_factory.mktemp("formats"))


def test_manifest_carries_roi_segment_and_the_params_defaults(cohort):
    cases = read_manifest(cohort.dicom, roi="lesion", seg_segment=None)
    assert [c.roi for c in cases] == ["GTV bone met", "lesion", "lesion", "lesion"]
    assert [c.seg_segment for c in cases] == [None, None, 1, "metastasis"]
    assert cases[0].mask_ref("manual").roi == "GTV bone met"
    assert cases[3].mask_ref("annotator").path.name == "case_003.nii.gz"
    assert all(c.patient_id is None and c.patient == c.case_id and c.site is None for c in cases)
    assert read_manifest(cohort.dicom)[1].roi is None  # no params default: the case must give it


def test_validation_reads_rtstruct_and_seg_masks(cohort, params):
    from bonemet.validation.cohort import validate_cohort

    report = validate_cohort(cohort.dicom, params.validation, mask_label=1, roi="lesion", seg_segment=None, pseudonym_key=None,
                             show_progress=False)
    assert report.passed, report.to_text()
    m = report.measurements.set_index("case_id")
    assert list(m["mask_format"]) == ["rtstruct", "rtstruct", "seg", "seg"]
    assert (m["annotator_mask_format"] == "labelmap").all()
    for case in cohort.cases:
        truth = _arr(read_mask(case.manual_mask, label=1)).sum()
        assert m.loc[case.case_id, "mask_label_voxels"] == pytest.approx(truth, rel=0.05)
    assert "mask_dicom" in [r.rule for r in report.rule_results]
    # without the params default, case 1's RTSTRUCT has no ROI name: listed with the names it holds
    report = validate_cohort(cohort.dicom, params.validation, mask_label=1, roi=None, seg_segment=None, pseudonym_key=None,
                             show_progress=False)
    assert report.bad_cases == ["case_001"]
    (failure,) = report.failures["case_001"]
    assert failure.rule == "mask_dicom" and "needs the lesion's ROI name; it holds ROIs 'lesion'" in failure.detail


def test_preprocess_and_extract_a_dicom_cohort(cohort, params, tmp_path):
    from bonemet.preprocessing import preprocess_cohort
    from bonemet.radiomics import extract_sources

    spec = params.preprocess.updated({"out_dir": str(tmp_path / "pre"), "n_jobs": 1,
                                      "target_spacing_mm": [2.5, 2.5, 2.5]})
    table = preprocess_cohort(cohort.dicom, spec, compute=LOCAL_COMPUTE, mask_label=1, grid_tolerance_mm=TOL, roi="lesion", seg_segment=None, pseudonym_key=None,
                              show_progress=False)
    reference = preprocess_cohort(cohort.nifti, spec.updated({"out_dir": str(tmp_path / "pre_nifti")}), compute=LOCAL_COMPUTE,
                                  mask_label=1,
                                  grid_tolerance_mm=TOL, roi=None, seg_segment=None, pseudonym_key=None,
                                  show_progress=False)
    for a, b in zip(table["mask"], reference["mask"], strict=True):
        dicom_mask, nifti_mask = (_arr(read_image(tmp_path / d / name)) for d, name in (("pre", a), ("pre_nifti", b)))
        assert _dice(dicom_mask, nifti_mask) >= 0.95

    cases = read_manifest(cohort.dicom, roi="lesion", seg_segment=None)
    kwargs = {"sources": ["manual", "annotator"], "auto_masks_dir": None, "n_jobs": 1, "compute": LOCAL_COMPUTE,
              "cache_dir": tmp_path / "cache", "allow_drop": False, "grid_tolerance_mm": TOL, "show_progress": False}
    def cached(tracker: RecordingTracker) -> int:  # how many the cache held: MLflow's, not the DVC output's
        return int(next(r for r in tracker.runs if r["name"] == "extract-manual")["metrics"]["n_cached"][-1][1])

    first = RecordingTracker()
    summary = extract_sources(cases, FAST, tmp_path / "features", tracker=first, **kwargs)
    assert summary["sources"]["manual"] == {"n_cases": 4, "n_dropped": 0} and cached(first) == 0
    manual = pd.read_parquet(tmp_path / "features" / "manual.parquet").set_index("case_id")
    nifti = extract_sources(read_manifest(cohort.nifti), FAST, tmp_path / "features_nifti",
                            **{**kwargs, "cache_dir": None, "sources": ["manual"]})
    assert nifti["sources"]["manual"]["n_cases"] == 4
    ref = pd.read_parquet(tmp_path / "features_nifti" / "manual.parquet").set_index("case_id")
    volume = "original_shape_VoxelVolume"
    for cid in ("case_002", "case_003"):  # SEG: the very same voxels
        assert manual.loc[cid, volume] == pytest.approx(ref.loc[cid, volume], rel=1e-6)
    for cid in ("case_000", "case_001"):  # RTSTRUCT: the contours' voxels (Dice >= 0.95)
        assert manual.loc[cid, volume] == pytest.approx(ref.loc[cid, volume], rel=0.08)
    second = RecordingTracker()
    again = extract_sources(cases, FAST, tmp_path / "features2", tracker=second, **kwargs)  # DICOM hashed
    assert cached(second) == 4 and again == summary  # the same summary, whatever the cache held


def test_the_cache_key_holds_the_roi_and_segment(cohort):
    from bonemet.radiomics import cache_key

    case = read_manifest(cohort.dicom)[0]
    plain = cache_key(case.image, case.manual_mask, FAST)
    assert cache_key(case.image, case.manual_mask, FAST, roi="GTV bone met") != plain
    assert cache_key(case.image, case.manual_mask, FAST, roi="a") != cache_key(case.image, case.manual_mask, FAST, roi="b")
    assert cache_key(case.image, case.manual_mask, FAST, seg_segment=1) != cache_key(case.image, case.manual_mask, FAST,
                                                                                 seg_segment=2)


def _bad_cohort(cohort: Cohort, root: Path) -> Path:
    """One bad DICOM mask per case, each a mistake the brief lists. A cohort is self-contained
    (paths leading out of it are refused): the good cohort's files are copied in."""
    import shutil

    bad = root / "bad"
    shutil.copytree(cohort.dicom / "images", bad / "dicom_images")
    shutil.copytree(cohort.dicom / "masks", bad / "masks")
    shutil.copytree(cohort.nifti / "images", bad / "nifti_images")
    good = pd.read_csv(cohort.dicom / "manifest.csv", dtype=str, keep_default_na=False).set_index("case_id")
    rows = []

    def row(cid, image, mask, roi="", segment="", source="case_000"):
        rows.append({"case_id": cid, "label": good.loc[source, "label"], "image": image, "mask": mask, "roi": roi,
                     "segment": segment})

    d = cohort.dicom
    # 1. unknown ROI name; 2. an RTSTRUCT of another case's series
    row("unknown_roi", "dicom_images/case_000", "masks/case_000_rs.dcm", roi="tumour")
    row("other_series", "dicom_images/case_000", "masks/case_001_rs.dcm", roi="lesion")
    # 3. a structure outside the image: drawn on a copy of the CT moved 200 mm to the side
    ct = read_image(cohort.cases[0].image)
    moved = sitk.Image(ct)
    moved.SetOrigin(tuple(np.add(ct.GetOrigin(), (200.0, 0, 0))))
    write_dicom_series(moved, root / "moved_series")
    mask = read_mask(cohort.cases[0].manual_mask, label=1)
    mask.CopyInformation(read_image(root / "moved_series"))
    write_rtstruct(mask, root / "moved_series", bad / "masks/outside.dcm", "lesion", algorithm_type="MANUAL",
                   grid_tolerance_mm=TOL)
    row("outside", f"nifti_images/{cohort.cases[0].image.name}", "masks/outside.dcm", roi="lesion")
    # 4. an empty structure: the ROI without its contours
    ds = pydicom.dcmread(d / "masks/case_000_rs.dcm")
    del ds.ROIContourSequence[0].ContourSequence
    ds.save_as(bad / "masks/empty.dcm")
    row("empty", "dicom_images/case_000", "masks/empty.dcm", roi="GTV bone met")
    # 5. a SEG on another grid: made over a 2x finer series of the same CT
    fine = sitk.Resample(ct, [2 * s for s in ct.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor, ct.GetOrigin(),
                         [s / 2 for s in ct.GetSpacing()], ct.GetDirection(), 0, ct.GetPixelID())
    write_dicom_series(fine, root / "fine_series")
    fine_mask = sitk.Resample(read_mask(cohort.cases[0].manual_mask, label=1), fine, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0)
    fine_mask.CopyInformation(read_image(root / "fine_series"))
    write_seg(fine_mask, root / "fine_series", bad / "masks/fine_seg.dcm", algorithm_type="MANUAL", grid_tolerance_mm=TOL)
    row("seg_grid", f"nifti_images/{cohort.cases[0].image.name}", "masks/fine_seg.dcm", segment="1")
    # 6. an unknown segment
    row("unknown_segment", "dicom_images/case_002", "masks/case_002_seg.dcm", segment="7", source="case_002")
    # the classes: validation also checks both labels are present
    row("fine_case", "dicom_images/case_003", "masks/case_003_seg.dcm", segment="1", source="case_003")
    pd.DataFrame(rows).to_csv(bad / "manifest.csv", index=False)
    return bad


def test_validation_lists_every_bad_dicom_mask_with_the_fix(cohort, params, tmp_path):
    from bonemet.validation.cohort import validate_cohort

    bad = _bad_cohort(cohort, tmp_path)
    report = validate_cohort(bad, params.validation, mask_label=1, roi=None, seg_segment=None, pseudonym_key=None, show_progress=False)
    expected = {
        "unknown_roi": r"no ROI named 'tumour'; the RTSTRUCT holds ROIs 'GTV bone met': set the case's roi",
        "other_series": r"the RTSTRUCT was drawn on series .*, not on the image's series .*; give the RTSTRUCT",
        "outside": r"lies outside the image .*give that image",
        "empty": r"ROI 'GTV bone met' has no contour; it is empty",
        "seg_grid": r"the SEG is on another grid: give the SEG made on this image's series",
        "unknown_segment": r"no segment number 7; the SEG holds segments 1 'metastasis': set the case's segment",
    }
    assert sorted(report.bad_cases) == sorted(expected)
    for cid, pattern in expected.items():
        failures = [f for f in report.failures[cid] if f.severity == "hard"]
        assert [f.rule for f in failures] == ["mask_dicom"], (cid, failures)
        assert re.search(pattern, failures[0].detail), (cid, failures[0].detail)
        assert f"case '{cid}'" in failures[0].detail  # names the case and the file
        mask = pd.read_csv(bad / "manifest.csv").set_index("case_id").loc[cid, "mask"]
        assert Path(mask).name in failures[0].detail
    assert "fine_case" not in report.failures


def test_patient_and_site_columns(tmp_path):
    rows = pd.DataFrame({"case_id": ["a", "b", "c"], "label": [0, 1, 1], "image": "x.nii.gz", "mask": "y.nii.gz",
                         "patient_id": ["p1", "p1", "p2"], "site": ["A", "", "B"], "segment": ["2", "lesion", ""],
                         "annotator_mask": ["z.dcm", "", ""], "annotator_roi": ["reader2", "", ""], "note": "kept"})
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    cases = read_manifest(tmp_path, roi="GTV", seg_segment=3)
    assert [c.patient for c in cases] == ["p1", "p1", "p2"]
    assert [c.site for c in cases] == ["A", None, "B"]
    assert [c.seg_segment for c in cases] == [2, "lesion", 3]
    assert cases[0].mask_ref("annotator").roi == "reader2" and cases[0].mask_ref("annotator").seg_segment == 2
    assert cases[0].metadata == {"note": "kept"}
    rows.loc[1, "patient_id"] = ""
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match="case 'b': empty patient_id"):
        read_manifest(tmp_path)
