"""The second synthetic generator (issue 23 §2): seeded, in the bring-your-own format, valid, and
what its protocol and lesion model ask for."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from bonemet.data.manifest import read_manifest
from bonemet.data.synthetic_latents import SyntheticParamsError
from bonemet.data.synthetic_longbone import LesionModel, ScanProtocol, generate_longbone_cohort
from bonemet.validation.cohort import validate_cohort

LESIONS = LesionModel(volume_ml=(0.2, 10.0), contrast_hu=(40.0, 1000.0), density_mean=(0.35, 0.65))
THIN = ScanProtocol(slice_thickness_mm=1.25, pixel_spacing_mm=1.0, noise_sd_hu=15.0, kernel_sd_mm=0.5, hu_offset=0.0)
THICK = ScanProtocol(slice_thickness_mm=5.0, pixel_spacing_mm=1.0, noise_sd_hu=60.0, kernel_sd_mm=1.2, hu_offset=30.0)
#: coarse and noiseless: many cases in little time, lesion HU measurable without noise
COARSE = ScanProtocol(slice_thickness_mm=5.0, pixel_spacing_mm=2.0, noise_sd_hu=0.0, kernel_sd_mm=0.0, hu_offset=0.0)


def _digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=[THIN, THICK], ids=["1.25mm", "5mm"])
def cohort(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("longbone")
    summary = generate_longbone_cohort(out, n_cases=8, n_positive=4, seed=7, protocol=request.param, lesions=LESIONS,
                                       mask_label=1)
    return out, summary, request.param


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    kwargs = {"n_cases": 3, "n_positive": 1, "protocol": THICK, "lesions": LESIONS, "mask_label": 1}
    generate_longbone_cohort(tmp_path / "a", seed=11, **kwargs)
    generate_longbone_cohort(tmp_path / "b", seed=11, **kwargs)
    generate_longbone_cohort(tmp_path / "c", seed=12, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["images/lb_000.nii.gz"] != _digest(tmp_path / "c")["images/lb_000.nii.gz"]


def test_cases_are_readable_and_pass_the_cohort_validation(cohort, params):
    folder, summary, _ = cohort
    cases = read_manifest(folder)
    assert [c.case_id for c in cases] == [c["case_id"] for c in summary["cases"]]
    assert sorted(c.label for c in cases) == [0] * 4 + [1] * 4
    report = validate_cohort(folder, params.validation, mask_label=1, roi=None, seg_segment=None, pseudonym_key=None,
                             show_progress=False)
    assert report.passed, report.summary_text()
    assert not report.warned_cases


def test_grid_volume_and_hu_are_as_asked(cohort):
    folder, summary, protocol = cohort
    for case in summary["cases"]:
        image = sitk.ReadImage(str(folder / f"images/{case['case_id']}.nii.gz"))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"masks/{case['case_id']}.nii.gz")))
        assert image.GetPixelID() == sitk.sitkInt16 and mask.dtype == np.uint8
        assert image.GetSpacing()[2] == pytest.approx(protocol.slice_thickness_mm)
        assert image.GetSpacing()[0] == pytest.approx(protocol.pixel_spacing_mm)
        volume_ml = float((mask == 1).sum()) * np.prod(image.GetSpacing()) / 1000.0
        assert volume_ml == pytest.approx(case["lesion_volume_ml"], rel=1e-6)
        low, high = LESIONS.volume_ml
        assert low * 0.95 <= volume_ml <= high * 1.05, case
        assert volume_ml == pytest.approx(case["lesion_volume_ml_drawn"], rel=0.05, abs=0.01)
        assert case["slice_thickness_mm"] == protocol.slice_thickness_mm and case["noise_sd_hu"] == protocol.noise_sd_hu


def test_lytic_lesions_are_near_the_marrow_and_blastic_ones_well_above(tmp_path):
    summary = generate_longbone_cohort(tmp_path, n_cases=40, n_positive=20, seed=3, protocol=COARSE, lesions=LESIONS,
                                       mask_label=1)
    cases = summary["cases"]
    by_class = {k: [c for c in cases if c["density_class"] == k] for k in ("lytic", "mixed", "blastic")}
    assert all(by_class.values()), {k: len(v) for k, v in by_class.items()}
    for case in cases:
        measured = np.array(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"images/{case['case_id']}.nii.gz"))))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"masks/{case['case_id']}.nii.gz"))) == 1
        over_marrow = float(measured[mask].mean()) - case["marrow_hu"]
        assert over_marrow == pytest.approx(case["lesion_hu_mean"] - case["marrow_hu"], abs=1e-3)
        if case["density_class"] == "lytic":
            assert 0.0 < over_marrow < 150.0, case
        elif case["density_class"] == "blastic":
            assert over_marrow > 250.0, case
    density = {label: np.mean([c["lesion_contrast_hu"] for c in cases if c["label"] == label]) for label in (0, 1)}
    assert density[1] > density[0] + 100.0
    assert any(c["density_class"] == "lytic" for c in cases if c["label"] == 1)  # overlap
    assert any(c["density_class"] != "lytic" for c in cases if c["label"] == 0)
    assert json.loads((tmp_path / "cohort.json").read_text())["generator"] == "bonemet.data.synthetic_longbone"


def test_bad_arguments_are_refused_by_name(tmp_path):
    with pytest.raises(SyntheticParamsError, match="slice_thickness_mm"):
        ScanProtocol(slice_thickness_mm=0.0, pixel_spacing_mm=1.0, noise_sd_hu=1.0, kernel_sd_mm=0.0, hu_offset=0.0)
    with pytest.raises(SyntheticParamsError, match="volume_ml"):
        LesionModel(volume_ml=(2.0, 1.0), contrast_hu=(40.0, 1000.0), density_mean=(0.3, 0.7))
    (tmp_path / "x").write_text("")
    with pytest.raises(SyntheticParamsError, match="not empty"):
        generate_longbone_cohort(tmp_path, n_cases=2, n_positive=1, seed=0, protocol=COARSE, lesions=LESIONS,
                                 mask_label=1)
