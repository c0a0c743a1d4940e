"""Answers that know their domain: `bonemet predict` with the registered classifier says whether a CT
resembles the training cases (features, lesion volume, spacing, intensities) and why not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import planned
from bonemet.data.io import read_image, read_mask, write_image
from bonemet.radiomics import build_settings

PARAMS = planned.load(Path(__file__).resolve().parents[1] / "params.yaml")
LABEL = PARAMS.data.mask_label
TOLERANCE_MM = PARAMS.validation.grid_tolerance_mm
# first-order and shape features of the original image only: each extraction well under a second
SETTINGS = build_settings({"imageType": {"Original": {}}, "featureClass": {"firstorder": None, "shape": None},
                           "setting": {"geometryTolerance": 1e-4}},
                          PARAMS.radiomics.updated({"resampled_spacing_mm": []}), label=LABEL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small synthetic cohort, its features, a classifier with its training domain, registered in
    a local MLflow store and loaded back as `bonemet predict` loads it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bonemet.data.manifest import read_manifest
    from bonemet.data.synthetic import generate_cohort
    from bonemet.modeling.domain import fit_training_domain, report_measures
    from bonemet.radiomics import extract_features
    from bonemet.registry.loaders import load_classifier
    from bonemet.registry.pyfunc import log_classifier
    from bonemet.registry.store import MlflowTracker, register_model, set_alias
    from bonemet.validation.cohort import validate_cohort

    root = tmp_path_factory.mktemp("domain")
    generate_cohort(root / "cohort", n_cases=10, n_positive=5, seed=3, size="small", mask_label=LABEL,
                    show_progress=False)
    cases = read_manifest(root / "cohort")
    report = validate_cohort(root / "cohort", PARAMS.validation, mask_label=LABEL, roi=PARAMS.data.roi,
                             seg_segment=PARAMS.data.segment, pseudonym_key=None, show_progress=False).to_dict()
    table = pd.DataFrame([extract_features(c.image, c.manual_mask, SETTINGS, c.case_id,
                                           grid_tolerance_mm=TOLERANCE_MM) for c in cases])
    labels = np.asarray([c.label for c in cases])
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(table, labels)
    ids = [c.case_id for c in cases]
    domain = fit_training_domain(pipeline, table, np.arange(len(cases)) % 5, PARAMS.train.domain, seed=0,
                                 images=report_measures(json.loads(json.dumps(report)), ids))
    tracker = MlflowTracker("domain-test", tracking_uri=None, store_dir=root / "mlruns", system_metrics=False,
                            system_metrics_interval_s=None)
    with tracker.run("register"):
        info = log_classifier(tracker, pipeline, list(table.columns), threshold=0.5, model_name="logreg",
                              domain=domain, check_rows=table)
    set_alias(tracker.client, "bonemet-classifier", "staging", register_model(tracker.client, info, "bonemet-classifier"))
    classifier = load_classifier("bonemet-classifier", "staging", store_dir=str(root / "mlruns"))  # through MLflow
    return {"cases": cases, "classifier": classifier, "domain": domain, "root": root}


def _predict(trained, image, mask):
    from bonemet.serving.predict import Predictor

    predictor = Predictor(load_classifier=lambda: trained["classifier"], load_segmenter=lambda: None,
                          radiomics_settings=SETTINGS, mask_label=LABEL, threshold=0.5, grid_tolerance_mm=TOLERANCE_MM,
                          min_lesion_ml=PARAMS.validation.lesion_volume_ml[0], alias="staging")
    return predictor.predict_case(image, mask)


def test_a_training_case_is_in_domain(trained):
    assert trained["classifier"].domain is not None
    for case in trained["cases"][:3]:
        out = _predict(trained, case.image, case.manual_mask)
        assert out["in_domain"] is True and out["domain_reasons"] == [], out["domain_reasons"]


def test_another_protocol_is_flagged(trained, tmp_path):
    """The same anatomy, scanned as another protocol: 6 mm slices; and a CT stored without its
    rescale intercept (every value 1024 higher)."""
    case = trained["cases"][0]
    image, mask = read_image(case.image), read_mask(case.manual_mask, label=LABEL)
    spacing = list(image.GetSpacing())
    thick = [spacing[0], spacing[1], 6.0]
    size = [image.GetSize()[0], image.GetSize()[1], int(round(image.GetSize()[2] * spacing[2] / 6.0))]

    def resample(img, interpolator):
        return sitk.Resample(img, size, sitk.Transform(), interpolator, img.GetOrigin(), thick, img.GetDirection())

    write_image(resample(image, sitk.sitkLinear), tmp_path / "thick.nii.gz")
    write_image(resample(mask, sitk.sitkNearestNeighbor) * LABEL, tmp_path / "thick_mask.nii.gz")
    out = _predict(trained, tmp_path / "thick.nii.gz", tmp_path / "thick_mask.nii.gz")
    assert out["in_domain"] is False
    assert any(r.startswith("coarsest voxel spacing 6 mm is above the training cases'") for r in out["domain_reasons"])

    write_image(sitk.Cast(image, sitk.sitkInt16) + 1024, tmp_path / "raw.nii.gz")
    out = _predict(trained, tmp_path / "raw.nii.gz", case.manual_mask)
    assert out["in_domain"] is False
    assert any(r.startswith("lowest intensity") and "is above the training cases'" in r for r in out["domain_reasons"])


def _ct(array_zyx: np.ndarray, spacing: float) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx.astype(np.int16))
    image.SetSpacing((spacing,) * 3)
    return image


def test_another_body_region_is_flagged(trained, tmp_path):
    """A lung-like CT: air-filled tissue around a soft-tissue nodule, no bone."""
    rng = np.random.default_rng(0)
    shape, spacing = (28, 32, 32), 2.5
    lung = rng.normal(-850, 40, size=shape)
    zz, yy, xx = np.indices(shape)
    nodule = (zz - 14) ** 2 + (yy - 16) ** 2 + (xx - 16) ** 2 <= 4**2
    lung[nodule] = rng.normal(40, 15, size=int(nodule.sum()))
    write_image(_ct(lung, spacing), tmp_path / "lung.nii.gz")
    mask = sitk.GetImageFromArray((nodule * LABEL).astype(np.uint8))
    mask.SetSpacing((spacing,) * 3)
    write_image(mask, tmp_path / "lung_mask.nii.gz")
    out = _predict(trained, tmp_path / "lung.nii.gz", tmp_path / "lung_mask.nii.gz")
    assert out["in_domain"] is False
    assert any(r.startswith("highest intensity") and "is below the training cases'" in r for r in out["domain_reasons"])


def test_a_300_ml_region_is_flagged(trained, tmp_path):
    """A 300 mL region (a bone-like block around a lesion far larger than any training lesion)."""
    rng = np.random.default_rng(1)
    shape, spacing = (64, 64, 64), 2.5
    volume = rng.normal(300, 120, size=shape)
    volume[:, :, :4] = -1000.0  # some air, as in the training CTs
    volume[20:44, 20:44, 20:44] += 900.0
    region = np.zeros(shape, dtype=np.uint8)
    side = round((300_000 / spacing**3) ** (1 / 3))  # voxels per side of a 300 mL cube
    lo = (64 - side) // 2
    region[lo:lo + side, lo:lo + side, lo:lo + side] = LABEL
    write_image(_ct(volume, spacing), tmp_path / "big.nii.gz")
    mask = sitk.GetImageFromArray(region)
    mask.SetSpacing((spacing,) * 3)
    write_image(mask, tmp_path / "big_mask.nii.gz")
    out = _predict(trained, tmp_path / "big.nii.gz", tmp_path / "big_mask.nii.gz")
    assert out["lesion_volume_ml"] == pytest.approx(300, rel=0.05)
    assert out["in_domain"] is False
    assert any(r.startswith("lesion volume 29") or r.startswith("lesion volume 30") for r in out["domain_reasons"]), \
        out["domain_reasons"]
