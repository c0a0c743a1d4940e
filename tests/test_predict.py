"""`bonemet predict`: prediction from a CT with a given mask or a segmenter, any format and grid."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml

import planned
from bonemet.data.io import ImageReadError, read_image, read_mask, same_grid, write_image
from bonemet.data.masks import mask_volume_ml
from bonemet.radiomics import build_settings
from bonemet.segmentation.inference import CaseInferenceError, InferenceSettings
from bonemet.serving.checks import check_feature_frame
from bonemet.serving.predict import NetworkSegmenter, PredictError, Predictor, case_id_from_path

PARAMS = planned.load(Path(__file__).resolve().parents[1] / "params.yaml")
LABEL = PARAMS.data.mask_label
TOLERANCE_MM = PARAMS.validation.grid_tolerance_mm
MIN_LESION_ML = PARAMS.validation.lesion_volume_ml[0]
# A PyRadiomics settings file with a small subset of the features keeps each extraction well under a
# second; params.yaml's radiomics values go over it (bin width 25 HU, no resampling here).
SETTINGS_FILE = {
    "imageType": {"Original": {}},
    "featureClass": {"firstorder": None, "shape": None},
    "setting": {"geometryTolerance": 1e-4},
}
RADIOMICS = PARAMS.radiomics.updated({"resampled_spacing_mm": []})
SETTINGS = build_settings(SETTINGS_FILE, RADIOMICS, label=LABEL)
# coarse grid and small crop: the synthetic 'small' CTs are ~32^3 voxels of ~2.4 mm
PREPROCESS = PARAMS.preprocess.updated({
    "target_spacing_mm": [3.0, 3.0, 3.0], "image_interpolator": "linear", "crop.margin_mm": 6.0,
    "crop.min_size_vox": [16, 16, 16], "crop.min_component_ml": 0.5,
})
INFERENCE = InferenceSettings.from_params(PREPROCESS, PARAMS.segment.updated({
    "roi_size": [16, 16, 16], "inference.overlap": 0.25, "inference.sw_batch_size": 2, "inference.mirror_axes": [],
    "threshold": 0.5, "largest_component": True,
}))


def _metadata(settings: InferenceSettings = INFERENCE) -> dict:
    """The metadata `bonemet segment` logs with the registered segmentation model."""
    return {"network": "bright-is-lesion", "network_kwargs": {}, **settings.to_metadata(), "source_fold": 0,
            "source_run_id": ""}


class SklearnClassifier:
    """Stands in for the registered pyfunc: same input checks, same output columns."""

    def __init__(self, pipeline, feature_names, name="bonemet-classifier", version="7"):
        self.pipeline, self.feature_names, self.name, self.version = pipeline, list(feature_names), name, version
        self.seen: list[pd.DataFrame] = []

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        self.seen.append(features)
        x = check_feature_frame(features, self.feature_names)
        proba = self.pipeline.predict_proba(x)[:, 1]
        return pd.DataFrame({"probability_breast": proba, "label": (proba >= 0.5).astype(int)})


class SphereSegmenter:
    """A fake segmenter: a sphere of ``radius_mm`` around the CT's centre, on the CT's grid."""

    name, version = "fake-missu", "3"

    def __init__(self, radius_mm: float = 8.0, empty: bool = False, off_grid: bool = False):
        self.radius_mm, self.empty, self.off_grid = radius_mm, empty, off_grid
        self.calls = 0

    def segment(self, image_hu: sitk.Image, case_id: str) -> sitk.Image:
        self.calls += 1
        size = np.asarray(image_hu.GetSize())
        zz, yy, xx = np.indices(size[::-1])
        idx = np.stack([xx, yy, zz], -1).reshape(-1, 3).astype(float)
        direction = np.asarray(image_hu.GetDirection()).reshape(3, 3)
        to_phys = direction @ np.diag(image_hu.GetSpacing())
        centre = (size - 1) / 2.0
        dist = np.linalg.norm((idx - centre) @ to_phys.T, axis=1).reshape(size[::-1])
        mask = sitk.GetImageFromArray(((dist <= self.radius_mm) & (not self.empty)).astype(np.uint8))
        mask.CopyInformation(image_hu)
        if self.off_grid:
            mask.SetOrigin(tuple(o + 5.0 for o in image_hu.GetOrigin()))
        return mask


class BrightIsLesion(torch.nn.Module):
    """A fixed 'network' for the real preprocessing path: lesion logit grows with intensity."""

    def forward(self, x):
        fg = 20 * (x - 0.5)
        return torch.cat([-fg, fg], dim=1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from bonemet.data.manifest import read_manifest
    from bonemet.data.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, n_cases=6, n_positive=3, seed=0, size="small", mask_label=LABEL, show_progress=False)
    return read_manifest(out)


@pytest.fixture(scope="module")
def classifier(cohort):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bonemet.radiomics import extract_features

    rows = [extract_features(c.image, c.manual_mask, SETTINGS, c.case_id, grid_tolerance_mm=TOLERANCE_MM)
            for c in cohort]
    table = pd.DataFrame(rows)
    labels = [c.label for c in cohort]
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(table, labels)
    model = SklearnClassifier(pipeline, table.columns)
    model.table = table
    return model


def _predict(image, mask=None, segmenter=None, classifier=None, **kw):
    """Predictor.predict_case with params.yaml's settings (mask label, grid tolerance, register.threshold)."""
    predictor = Predictor(load_classifier=lambda: classifier, load_segmenter=lambda: segmenter,
                          radiomics_settings=SETTINGS, mask_label=LABEL, threshold=kw.pop("threshold", 0.5),
                          grid_tolerance_mm=kw.pop("grid_tolerance_mm", TOLERANCE_MM),
                          min_lesion_ml=kw.pop("min_lesion_ml", MIN_LESION_ML), alias=None)
    return predictor.predict_case(image, mask, **kw)


def test_case_id_from_path(tmp_path):
    assert case_id_from_path("a/b/case_007.nii.gz") == "case_007"
    assert case_id_from_path("x.nrrd") == "x"
    (tmp_path / "series.dir").mkdir()
    assert case_id_from_path(tmp_path / "series.dir") == "series.dir"


def test_with_given_mask_matches_direct_classification(cohort, classifier):
    case = cohort[3]
    out = _predict(case.image, case.manual_mask, classifier=classifier)
    json.dumps(out, allow_nan=False)  # the command prints it
    mask = read_mask(case.manual_mask, label=LABEL)
    assert out["case_id"] == case.case_id and out["mask_source"] == "given"
    assert out["models"]["segmenter"] is None and out["models"]["classifier"] == {"name": "bonemet-classifier",
                                                                                   "version": "7"}
    voxels = int(sitk.GetArrayViewFromImage(mask).sum())
    assert out["lesion_volume_ml"] == pytest.approx(mask_volume_ml(mask))
    assert out["lesion_volume_ml"] == pytest.approx(voxels * np.prod(mask.GetSpacing()) / 1000)  # mL = 1000 mm^3
    assert out["lesion_voxels"] == voxels > 0
    direct = classifier.pipeline.predict_proba(classifier.seen[-1])[0, 1]
    assert out["probability_breast"] == pytest.approx(direct)
    assert out["label"] == int(direct >= 0.5) and out["n_features"] == len(classifier.feature_names)
    # the threshold is the caller's, not the classifier's
    assert _predict(case.image, case.manual_mask, classifier=classifier, threshold=0.0)["label"] == 1
    assert _predict(case.image, case.manual_mask, classifier=classifier, threshold=1.0)["label"] == int(direct >= 1)


def test_segmenter_path_and_save_mask(cohort, classifier, tmp_path):
    case = cohort[0]
    segmenter = SphereSegmenter(radius_mm=8.0)
    saved = tmp_path / "out" / "lesion.nii.gz"
    out = _predict(case.image, segmenter=segmenter, classifier=classifier, save_mask=saved)
    assert segmenter.calls == 1 and out["mask_source"] == "auto"
    assert out["models"]["segmenter"] == {"name": "fake-missu", "version": "3"}
    written = read_image(saved)
    ok, why = same_grid(read_image(case.image), written, tol_mm=TOLERANCE_MM)
    assert ok, why
    assert int(sitk.GetArrayViewFromImage(written).sum()) == out["lesion_voxels"]
    assert out["lesion_volume_ml"] == pytest.approx(4 / 3 * np.pi * 8.0**3 / 1000, rel=0.35)
    assert out["saved_mask"] == str(saved) and not list(saved.parent.glob(".*"))  # no temp left behind
    # a given mask wins: the segmenter is not called
    _predict(case.image, case.manual_mask, segmenter=segmenter, classifier=classifier)
    assert segmenter.calls == 1


def _oblique(image: sitk.Image, spacing=(0.9, 1.7, 3.1)) -> sitk.Image:
    """Same voxels with an anisotropic spacing and a rotated (oblique) direction."""
    out = sitk.Image(image)
    rot = sitk.VersorTransform((0.3, 0.2, 1.0), 0.5).GetMatrix()
    out.SetDirection(rot)
    out.SetSpacing(spacing)
    out.SetOrigin((-40.0, 12.5, 300.0))
    return out


def test_oblique_anisotropic_image_with_real_preprocessing(cohort, classifier, tmp_path):
    """NetworkSegmenter: preprocessing (resample, crop) and mapping back on an oblique grid."""
    case = cohort[1]
    image = _oblique(read_image(case.image))
    mask = _oblique(read_mask(case.manual_mask, label=LABEL))
    write_image(image, tmp_path / "oblique.nrrd", compress=False)
    write_image(mask, tmp_path / "oblique_mask.nrrd", compress=False)
    given = _predict(tmp_path / "oblique.nrrd", tmp_path / "oblique_mask.nrrd", classifier=classifier)
    voxels = int(sitk.GetArrayViewFromImage(mask).sum())
    assert given["lesion_volume_ml"] == pytest.approx(voxels * 0.9 * 1.7 * 3.1 / 1000)

    segmenter = NetworkSegmenter.from_metadata(BrightIsLesion(), _metadata(), device="cpu", name="bonemet-segmenter",
                                             version="1")
    assert segmenter.settings == INFERENCE
    out = _predict(tmp_path / "oblique.nrrd", segmenter=segmenter, classifier=classifier,
                   save_mask=tmp_path / "auto.nii.gz")
    auto = read_image(tmp_path / "auto.nii.gz")
    ok, why = same_grid(image, auto, tol_mm=TOLERANCE_MM)
    assert ok, why
    # the 'network' marks dense bone (HU > 800); after a 3 mm round trip from 0.9 x 1.7 x 3.1 mm
    # voxels the mask is blurred but still lies on bright (> 200 HU) voxels of the original grid
    found = sitk.GetArrayViewFromImage(auto) > 0
    assert out["lesion_voxels"] == found.sum() > 0
    assert (found & (sitk.GetArrayViewFromImage(image) > 200)).sum() / found.sum() > 0.7
    # orientation does not matter: the same voxels with an identity direction give the same mask
    straight = sitk.Image(image)
    straight.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    again = segmenter.segment(straight, "straight")
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(again), found.astype(np.uint8))


def test_compressed_nrrd_input(cohort, classifier, tmp_path):
    case = cohort[1]
    write_image(read_image(case.image), tmp_path / "ct.nrrd", compress=True)
    write_image(read_mask(case.manual_mask, label=LABEL), tmp_path / "mask.nrrd", compress=True)
    assert _predict(tmp_path / "ct.nrrd", tmp_path / "mask.nrrd", classifier=classifier)["case_id"] == "ct"


def test_missu_segmenter_settings_come_from_the_model_metadata_only():
    """The registered model carries its inference settings; nothing falls back to params."""
    mirrored = InferenceSettings.from_params(PREPROCESS, PARAMS.segment.updated({
        "roi_size": [16, 16, 16], "inference.mirror_axes": [2, 0], "threshold": 0.4, "largest_component": False}))
    meta = json.loads(json.dumps(_metadata(mirrored)))  # as stored in the MLmodel file
    seg = NetworkSegmenter.from_metadata(BrightIsLesion(), meta, device="cpu", name="bonemet-segmenter", version="2")
    assert seg.settings == mirrored and seg.settings.preprocess.model_dump() == PREPROCESS.model_dump()
    assert seg.settings.roi_size == (16, 16, 16) and seg.settings.inference.mirror_axes == (0, 2)
    assert (seg.settings.threshold, seg.settings.largest_component) == (0.4, False)
    assert (seg.name, seg.version, seg.device) == ("bonemet-segmenter", "2", "cpu")
    # a model logged without its settings (an older bonemet) is refused, naming the model and the fix
    old = {k: v for k, v in meta.items() if k not in ("preprocess", "inference")}
    with pytest.raises(CaseInferenceError, match=r"bonemet-segmenter version 2: its metadata lacks preprocess, "
                                                 r"inference .*run `bonemet segment` again"):
        NetworkSegmenter.from_metadata(BrightIsLesion(), old, device="cpu", name="bonemet-segmenter", version="2")
    bad = {**meta, "inference": {**meta["inference"], "mirror_axes": [3]}}
    with pytest.raises(CaseInferenceError, match=r"invalid: inference\.mirror_axes: must be distinct spatial axes"):
        NetworkSegmenter.from_metadata(BrightIsLesion(), bad, device="cpu", name="bonemet-segmenter", version="2")
    typo = {**meta, "preprocess": {**meta["preprocess"], "hu_windw": [0, 1]}}
    with pytest.raises(CaseInferenceError, match=r"preprocess\.hu_windw: unknown key; did you mean hu_window\?"):
        NetworkSegmenter.from_metadata(BrightIsLesion(), typo, device="cpu", name="bonemet-segmenter", version="2")


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """Write ``image`` as an int16 CT DICOM series (one file per slice)."""
    folder.mkdir()
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[0::3], *direction[1::3]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.4242", "0020|000e": series_uid,
            "0020|0037": orientation, "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0032": "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0028|0030": "\\".join(f"{v:.10g}" for v in image.GetSpacing()[:2]),
            "0018|0050": f"{image.GetSpacing()[2]:.10g}",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_folder(cohort, classifier, tmp_path):
    case = cohort[4]
    _write_dicom_series(read_image(case.image), tmp_path / "dicom_ct")
    ct = read_image(tmp_path / "dicom_ct")
    mask = read_mask(case.manual_mask, label=LABEL)
    assert ct.GetSize() == mask.GetSize()
    mask.CopyInformation(ct)  # DICOM stores the geometry as decimal strings
    write_image(mask, tmp_path / "mask.nii.gz")
    out = _predict(tmp_path / "dicom_ct", tmp_path / "mask.nii.gz", classifier=classifier)
    assert out["case_id"] == "dicom_ct" and out["mask_source"] == "given"
    assert 0.0 <= out["probability_breast"] <= 1.0
    assert out["lesion_volume_ml"] == pytest.approx(mask_volume_ml(mask))


def test_bad_inputs_give_clear_errors(cohort, classifier, tmp_path):
    case = cohort[2]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file at all" * 10)
    with pytest.raises(ImageReadError, match="corrupt.nii.gz"):
        _predict(corrupt, classifier=classifier, segmenter=SphereSegmenter())
    with pytest.raises(ImageReadError, match="not found"):
        _predict(tmp_path / "missing.nrrd", classifier=classifier, segmenter=SphereSegmenter())

    shifted = read_mask(case.manual_mask, label=LABEL)
    shifted.SetOrigin(tuple(o + 3.0 for o in shifted.GetOrigin()))
    write_image(shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(PredictError, match=r"shifted.nii.gz is not on the grid.*origin"):
        _predict(case.image, tmp_path / "shifted.nii.gz", classifier=classifier)

    empty = sitk.Image(shifted)
    empty.CopyInformation(read_image(case.image))
    empty = empty * 0
    write_image(empty, tmp_path / "empty.nii.gz")
    with pytest.raises(PredictError, match="no lesion found"):
        _predict(case.image, tmp_path / "empty.nii.gz", classifier=classifier)
    with pytest.raises(PredictError, match="off the CT's grid"):
        _predict(case.image, segmenter=SphereSegmenter(off_grid=True), classifier=classifier)
    with pytest.raises(PredictError, match="no segmentation model"):
        _predict(case.image, classifier=classifier)


def test_mask_within_grid_tolerance_is_accepted(cohort, classifier, tmp_path):
    case = cohort[2]
    nudged = read_mask(case.manual_mask, label=LABEL)
    nudged.SetOrigin(tuple(o + 0.004 for o in nudged.GetOrigin()))
    write_image(nudged, tmp_path / "nudged.nii.gz")
    with pytest.raises(PredictError, match="not on the grid"):
        _predict(case.image, tmp_path / "nudged.nii.gz", classifier=classifier, grid_tolerance_mm=0.001)
    assert TOLERANCE_MM == 0.01  # params.yaml's validate.grid_tolerance_mm accepts the 0.004 mm nudge
    out = _predict(case.image, tmp_path / "nudged.nii.gz", classifier=classifier, grid_tolerance_mm=TOLERANCE_MM)
    assert out["lesion_voxels"] == int(sitk.GetArrayViewFromImage(nudged).sum())


def test_feature_mismatch_names_the_missing_columns(cohort, classifier):
    case = cohort[3]
    other = SklearnClassifier(classifier.pipeline, [*classifier.feature_names, "wavelet-LLH_glcm_Idm"])
    with pytest.raises(PredictError, match="wavelet-LLH_glcm_Idm"):
        _predict(case.image, case.manual_mask, classifier=other)


# --- the command --------------------------------------------------------------------------------


def _params_file(tmp_path, store_dir) -> None:
    """The repository's params.yaml with this test's radiomics settings file and MLflow store."""
    from bonemet.config import load_params

    (tmp_path / "radiomics.yaml").write_text(yaml.safe_dump(SETTINGS_FILE))
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["radiomics"].update(settings_file="radiomics.yaml", resampled_spacing_mm=[])
    params["tracking"]["store_dir"] = str(store_dir)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def cli_env(tmp_path, monkeypatch, classifier):
    """params file with the small settings; loaders replaced by the test models (no MLflow store).

    ``segmenter`` holds what the fake ``load_segmenter`` returns (a test may change it);
    ``loaded`` records each ``(name, alias)`` loaded.
    """
    import bonemet.registry.loaders as loaders

    monkeypatch.chdir(tmp_path)
    _params_file(tmp_path, tmp_path / "mlruns")
    env = SimpleNamespace(loaded=[], segmenter={"network": BrightIsLesion(), "metadata": _metadata()})

    def fake_classifier(name, alias, *, tracking_uri, store_dir):
        env.loaded.append((name, alias))
        classifier.threshold = 0.5
        return classifier

    def fake_segmenter(name, alias, *, device, tracking_uri, store_dir):
        env.loaded.append((name, alias))
        return env.segmenter["network"], env.segmenter["metadata"], "5"

    monkeypatch.setattr(loaders, "load_classifier", fake_classifier)
    monkeypatch.setattr(loaders, "load_segmenter", fake_segmenter)
    return env


def test_command_prints_json(cohort, cli_env, capsys, tmp_path):
    from bonemet.cli import main

    case = cohort[5]
    assert main(["predict", str(case.image), "--alias", "production", "--save-mask", "m.nii.gz"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mask_source"] == "auto" and out["alias"] == "production"
    assert out["models"]["segmenter"] == {"name": "bonemet-segmenter", "version": "5"}
    assert cli_env.loaded == [("bonemet-classifier", "production"), ("bonemet-segmenter", "production")]
    assert (tmp_path / "m.nii.gz").is_file()
    # the command segments as the library does with the model's settings
    direct = NetworkSegmenter(BrightIsLesion(), INFERENCE, "cpu", "bonemet-segmenter", "5").segment(
        read_image(case.image), case.case_id)
    assert out["lesion_voxels"] == int(sitk.GetArrayViewFromImage(direct).sum()) > 0

    cli_env.loaded.clear()
    assert main(["predict", str(case.image), "--mask", str(case.manual_mask), "--threshold", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mask_source"] == "given" and out["label"] == 1 and out["threshold"] == 0.0
    assert cli_env.loaded == [("bonemet-classifier", "staging")]  # no segmenter loaded when a mask is given


def test_command_segmentation_model_without_its_settings_is_a_user_error(cohort, cli_env, capsys, caplog):
    """No params fallback: a model whose metadata lacks its inference settings is refused in one line."""
    from bonemet.cli import main

    cli_env.segmenter["metadata"] = {k: v for k, v in _metadata().items() if k != "preprocess"}
    with caplog.at_level("INFO"):
        assert main(["predict", str(cohort[5].image)]) == 1
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.exc_info is None
    assert error.getMessage().startswith("segmentation model bonemet-segmenter version 5: its metadata lacks preprocess")
    assert capsys.readouterr().out == ""


class BrokenNetwork(torch.nn.Module):
    """A network with a bug (wrong output): not the user's fault."""

    def forward(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x7 and 8x2)")


def test_command_bug_keeps_its_type_and_traceback(cohort, cli_env, capsys):
    """A bug is not turned into exit 1: it propagates (traceback) with a note naming the case."""
    from bonemet.cli import main

    cli_env.segmenter["network"] = BrokenNetwork()
    case = cohort[5]
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        main(["predict", str(case.image)])
    assert f"while segmenting case '{case_id_from_path(case.image)}'" in "\n".join(info.value.__notes__)
    assert capsys.readouterr().out == ""


def test_command_bad_file_exits_1_without_traceback(cohort, cli_env, tmp_path):
    """A real process: exit code 1, one error line naming the file, no traceback, nothing on stdout.
    A bad params file is exit 2; a bug in a real process keeps its traceback."""
    import subprocess
    import sys

    (tmp_path / "broken.nrrd").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\n")
    (tmp_path / "mask.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    for argv, named in ((["broken.nrrd"], "broken.nrrd"), (["missing_folder/"], "missing_folder"),
                        ([str(cohort[0].image), "--mask", "mask.nii.gz"], "mask.nii.gz")):
        proc = subprocess.run([sys.executable, "-m", "bonemet", "predict", *argv], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert named in proc.stderr and "ERROR" in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert len([line for line in proc.stderr.splitlines() if "ERROR" in line]) == 1

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["validate"]["grid_tolerance_mmm"] = params["validate"].pop("grid_tolerance_mm")
    (tmp_path / "bad_params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "bonemet", "predict", str(cohort[0].image), "--params",
                           "bad_params.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "validate.grid_tolerance_mmm: unknown key; did you mean grid_tolerance_mm?" in proc.stderr

    # a bug (here: a segmentation model whose metadata is not a mapping) is a traceback, not one line
    script = ("import sys, bonemet.registry.loaders as L\n"
              "L.load_segmenter = lambda name, alias, **kw: (None, None, '1')\n"
              "L.load_classifier = lambda name, alias, **kw: type('C', (), {'threshold': 0.5})()\n"
              "from bonemet.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "predict", str(cohort[0].image)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr, proc.stderr
    assert "TypeError" in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_command_with_models_from_a_real_mlflow_store(store, cohort, capsys):
    """Both models registered in a local MLflow store, loaded by alias through bonemet.registry.loaders."""
    from bonemet.cli import main

    case = cohort[2]
    assert main(["predict", str(case.image)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["models"] == {"classifier": {"name": "bonemet-classifier", "version": "1"},
                             "segmenter": {"name": "bonemet-segmenter", "version": "1"}}
    assert out["threshold"] == 0.25 and out["mask_source"] == "auto"  # the registered threshold
    assert isinstance(out["in_domain"], bool) and isinstance(out["domain_reasons"], list)
    # the settings travelled with the model: the same mask as the library with INFERENCE
    direct = NetworkSegmenter(BrightIsLesion(), INFERENCE, "cpu", "bonemet-segmenter", "1").segment(
        read_image(case.image), case.case_id)
    assert out["lesion_voxels"] == int(sitk.GetArrayViewFromImage(direct).sum()) > 0
    assert main(["predict", str(case.image), "--alias", "production"]) == 1  # no such alias
    assert capsys.readouterr().out == ""


# --- results that say what they are ----------------------------------------------------------------


def test_empty_segmentation_is_no_lesion_found_never_a_probability(cohort, classifier):
    case = cohort[0]
    seen = len(classifier.seen)
    out = _predict(case.image, segmenter=SphereSegmenter(empty=True), classifier=classifier,
                   save_mask=Path("never-written.nii.gz"))
    json.dumps(out, allow_nan=False)
    assert out["status"] == "no_lesion" and out["probability_breast"] is None and out["label"] is None
    assert out["reason"].startswith("no lesion found: the segmentation model fake-missu version 3")
    assert out["lesion_voxels"] == 0 and out["lesion_volume_ml"] == 0.0 and out["n_features"] is None
    assert out["saved_mask"] is None and not Path("never-written.nii.gz").exists()
    assert out["in_domain"] is None and out["domain_reasons"] == []
    assert len(classifier.seen) == seen  # nothing was classified
    assert "features" not in out["seconds"] and out["seconds"]["segment"] >= 0


def test_lesion_below_the_validated_minimum_is_too_small_to_classify(cohort, classifier, tmp_path):
    """Smaller than validate.lesion_volume_ml[0] (0.05 mL): no probability, for a segmenter's mask
    and for a given one; the mask is still saved so that it can be looked at."""
    case = cohort[1]
    seen = len(classifier.seen)

    class OneVoxel(SphereSegmenter):
        def segment(self, image_hu, case_id):
            mask = sitk.Image(image_hu.GetSize(), sitk.sitkUInt8)
            mask.CopyInformation(image_hu)
            mask[5, 6, 7] = 1
            return mask

    tiny = _predict(case.image, segmenter=OneVoxel(), classifier=classifier, save_mask=tmp_path / "tiny.nii.gz")
    assert 0 < tiny["lesion_volume_ml"] < MIN_LESION_ML
    assert tiny["status"] == "lesion_too_small" and tiny["probability_breast"] is None and tiny["label"] is None
    assert tiny["reason"].startswith("lesion too small to classify") and f"{MIN_LESION_ML:g} mL" in tiny["reason"]
    assert tiny["saved_mask"] == str(tmp_path / "tiny.nii.gz")
    assert int(sitk.GetArrayViewFromImage(read_image(tmp_path / "tiny.nii.gz")).sum()) == tiny["lesion_voxels"]
    # a given mask of two voxels
    image = read_image(case.image)
    two = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    two.CopyInformation(image)
    two[10, 10, 5] = LABEL
    two[11, 10, 5] = LABEL
    write_image(two, tmp_path / "two.nii.gz")
    given = _predict(case.image, tmp_path / "two.nii.gz", classifier=classifier)
    assert given["status"] == "lesion_too_small" and given["mask_source"] == "given" and given["lesion_voxels"] == 2
    assert len(classifier.seen) == seen
    # at the minimum it is classified (a 2 x 2 x 2 block: PyRadiomics needs a 3D lesion)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                two[10 + dx, 10 + dy, 5 + dz] = LABEL
    write_image(two, tmp_path / "eight.nii.gz")
    volume = 8 * float(np.prod(image.GetSpacing())) / 1000
    assert _predict(case.image, tmp_path / "eight.nii.gz", classifier=classifier,
                    min_lesion_ml=volume * 1.01)["status"] == "lesion_too_small"
    at_minimum = _predict(case.image, tmp_path / "eight.nii.gz", classifier=classifier, min_lesion_ml=volume)
    assert at_minimum["status"] == "classified" and at_minimum["reason"] is None
    assert 0.0 <= at_minimum["probability_breast"] <= 1.0


def test_domain_fields_come_from_the_classifiers_answer_and_domain(cohort, classifier):
    """The registered model's training-domain verdict (its answer's domain_reasons, and the CT against
    its domain) is passed on; without an answer (no lesion) the CT alone is checked; a classifier
    that knows no domain gives null."""
    from bonemet.serving.predict import domain_fields

    image = read_image(cohort[0].image)
    assert domain_fields(None, classifier, image) == {"in_domain": None, "domain_reasons": []}
    answer = pd.DataFrame({"probability_breast": [0.4], "label": [0], "in_domain": [False],
                           "domain_reasons": [["lesion volume 300 mL above the training range"]]})
    assert domain_fields(answer, classifier, image) == {
        "in_domain": False, "domain_reasons": ["lesion volume 300 mL above the training range"]}

    class Domain:
        def image_reasons(self, measures):
            return [f"in-plane spacing {measures['spacing_max_mm']:.2f} mm outside the training range"]

    class WithDomain(SklearnClassifier):
        domain = Domain()

        def predict(self, features):
            out = super().predict(features)
            out["in_domain"], out["domain_reasons"] = True, [[]]
            return out

    model = WithDomain(classifier.pipeline, classifier.feature_names)
    out = _predict(cohort[3].image, cohort[3].manual_mask, classifier=model)
    assert out["in_domain"] is False and out["domain_reasons"][0].startswith("in-plane spacing")
    none = _predict(cohort[3].image, segmenter=SphereSegmenter(empty=True), classifier=model)
    assert none["status"] == "no_lesion" and none["in_domain"] is False and len(none["domain_reasons"]) == 1


def test_command_no_lesion_prints_the_result_and_exits_0(cohort, cli_env, capsys):
    from bonemet.cli import main

    class Nothing(torch.nn.Module):
        def forward(self, x):
            return torch.cat([torch.ones_like(x), -torch.ones_like(x)], dim=1)

    cli_env.segmenter["network"] = Nothing()
    assert main(["predict", str(cohort[5].image)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "no_lesion" and out["probability_breast"] is None and out["label"] is None
    assert out["models"]["segmenter"] == {"name": "bonemet-segmenter", "version": "5"}


def test_command_disable_tta_turns_mirroring_off(cohort, cli_env, capsys, monkeypatch):
    from bonemet.cli import main
    from bonemet.serving import predict as serving

    mirrored = InferenceSettings.from_params(PREPROCESS, PARAMS.segment.updated({
        "roi_size": [16, 16, 16], "inference.mirror_axes": [0, 1, 2]}))
    cli_env.segmenter["metadata"] = _metadata(mirrored)
    used = []
    real = serving.NetworkSegmenter.segment

    def spy(self, image_hu, case_id):
        used.append(self.settings.inference.mirror_axes)
        return real(self, image_hu, case_id)

    monkeypatch.setattr(serving.NetworkSegmenter, "segment", spy)
    assert main(["predict", str(cohort[5].image)]) == 0
    assert main(["predict", str(cohort[5].image), "--disable-tta"]) == 0
    capsys.readouterr()
    assert used == [(0, 1, 2), ()]


# --- many CTs at once ------------------------------------------------------------------------------


def _batch_folder(cohort, root: Path) -> Path:
    """Two NIfTI CTs, one DICOM series, one corrupt file and a text file nobody should read."""
    from bonemet.data.dicom_series import write_dicom_series

    folder = root / "cts"
    folder.mkdir()
    for case in cohort[:2]:
        write_image(read_image(case.image), folder / f"{case.case_id}.nii.gz")
    write_dicom_series(read_image(cohort[2].image), folder / "series_c")
    (folder / "broken.nrrd").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\n")
    (folder / "notes.txt").write_text("not a CT")
    return folder


def test_read_batch_input_folder_and_manifest(cohort, tmp_path):
    from bonemet.serving.batch import BatchInputError, read_batch_input

    folder = _batch_folder(cohort, tmp_path)
    cases = read_batch_input(folder)
    assert [c.case_id for c in cases] == ["broken", cohort[0].case_id, cohort[1].case_id, "series_c"]
    assert all(c.mask is None for c in cases)
    manifest = tmp_path / "predict.csv"
    manifest.write_text("case_id,image,mask,roi\nA,cts/case_000.nii.gz,m/a.nii.gz,\nB,cts/series_c,,GTV\n")
    a, b = read_batch_input(manifest)
    assert (a.case_id, a.image, a.mask) == ("A", tmp_path / "cts/case_000.nii.gz", tmp_path / "m/a.nii.gz")
    assert (b.mask, b.roi) == (None, "GTV")
    # a cohort folder: its manifest (label ignored), masks per case
    cohort_dir = Path(cohort[0].image).parents[1]
    assert [c.case_id for c in read_batch_input(cohort_dir)] == [c.case_id for c in cohort]
    assert read_batch_input(cohort_dir)[0].mask == cohort[0].manual_mask
    bad = tmp_path / "bad.csv"
    bad.write_text("id,path\nA,x.nii.gz\n")
    with pytest.raises(BatchInputError, match=r"bad.csv: missing column\(s\) case_id, image"):
        read_batch_input(bad)
    bad.write_text("case_id,image\nA,x.nii.gz\nA,y.nii.gz\n")
    with pytest.raises(BatchInputError, match="case id.* A appear more than once"):
        read_batch_input(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchInputError, match="no CT found"):
        read_batch_input(tmp_path / "empty")
    with pytest.raises(BatchInputError, match="no such folder or manifest"):
        read_batch_input(tmp_path / "missing")


def _rows(path: Path) -> dict[str, dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def test_batch_over_a_folder_one_failing_case(cohort, cli_env, capsys, tmp_path):
    """Every case gets a row with the JSON's fields; the broken one says why and the others are done;
    the models are loaded once; exit code 1 because a case failed."""
    from bonemet.cli import main
    from bonemet.serving.batch import RESULT_COLUMNS

    folder = _batch_folder(cohort, tmp_path)
    code = main(["predict", "-i", str(folder), "-o", "out/results.csv", "--save-masks", "out/masks", "--no-progress"])
    assert code == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["cases"] == 4 and summary["statuses"]["failed"] == 1
    assert cli_env.loaded == [("bonemet-classifier", "staging"), ("bonemet-segmenter", "staging")]
    rows = _rows(tmp_path / "out" / "results.csv")
    header = list(next(iter(rows.values())))
    assert header[:len(RESULT_COLUMNS)] == list(RESULT_COLUMNS)
    assert {"seconds.read", "seconds.segment", "seconds.features"} <= set(header)
    broken = rows.pop("broken")
    assert broken["status"] == "failed" and "broken.nrrd" in broken["reason"] and broken["probability_breast"] == ""
    for case_id, row in rows.items():
        assert row["status"] in ("classified", "no_lesion", "lesion_too_small"), row
        assert row["mask_source"] == "auto" and row["models.segmenter.version"] == "5"
        if row["status"] == "classified":
            assert 0.0 <= float(row["probability_breast"]) <= 1.0 and row["label"] in ("0", "1")
            assert (tmp_path / "out" / "masks" / f"{case_id}.nii.gz").is_file()
        assert json.loads(row["image.size"]) == list(read_image(folder / (
            case_id if case_id == "series_c" else f"{case_id}.nii.gz")).GetSize())
    # the same CT alone gives the same answer as its row
    assert main(["predict", str(folder / f"{cohort[0].case_id}.nii.gz")]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert rows[cohort[0].case_id]["status"] == alone["status"]
    if alone["probability_breast"] is not None:
        assert float(rows[cohort[0].case_id]["probability_breast"]) == pytest.approx(alone["probability_breast"])


def test_batch_over_a_manifest_with_masks(cohort, cli_env, capsys, tmp_path):
    """Masks from the manifest, one case segmented (empty mask cell), one mask off its CT's grid
    (failed, the others done); with every mask given the segmentation model is never loaded."""
    from bonemet.cli import main

    shifted = read_mask(cohort[1].manual_mask, label=LABEL)
    shifted.SetOrigin(tuple(o + 3.0 for o in shifted.GetOrigin()))
    write_image(shifted * LABEL, tmp_path / "shifted.nii.gz")
    lines = ["case_id,label,image,mask",
             f"good,1,{cohort[0].image},{cohort[0].manual_mask}",
             f"offgrid,0,{cohort[1].image},{tmp_path / 'shifted.nii.gz'}",
             f"auto,1,{cohort[2].image},"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    assert main(["predict", "-i", "m.csv", "-o", "r.csv", "--no-progress"]) == 1
    capsys.readouterr()
    rows = _rows(tmp_path / "r.csv")
    assert list(rows) == ["good", "offgrid", "auto"]
    assert rows["good"]["status"] == "classified" and rows["good"]["mask_source"] == "given"
    assert rows["offgrid"]["status"] == "failed" and "is not on the grid" in rows["offgrid"]["reason"]
    assert rows["auto"]["mask_source"] == "auto"
    # the row's answer is the single-CT answer
    assert main(["predict", str(cohort[0].image), "--mask", str(cohort[0].manual_mask)]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert float(rows["good"]["probability_breast"]) == pytest.approx(alone["probability_breast"])
    assert float(rows["good"]["lesion_volume_ml"]) == pytest.approx(alone["lesion_volume_ml"])

    cli_env.loaded.clear()
    (tmp_path / "all.csv").write_text("\n".join(lines[:2]) + "\n")
    assert main(["predict", "-i", "all.csv", "-o", "all_out.csv", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["statuses"] == {"classified": 1}
    assert cli_env.loaded == [("bonemet-classifier", "staging")]


def test_batch_needs_both_input_and_output(cli_env, caplog):
    from bonemet.cli import main

    assert main(["predict", "-i", "somewhere"]) == 1
    assert "needs both -i DIR_OR_MANIFEST and -o OUT.csv" in caplog.text
    assert main(["predict"]) == 1
    assert "no CT given" in caplog.text


# --- DICOM SEG for a DICOM series input ------------------------------------------------------------


def test_save_mask_as_dicom_seg_over_the_series(cohort, cli_env, capsys, tmp_path):
    """`--save-mask out.dcm` on a DICOM series: a DICOM SEG referencing the series, which reads back
    onto the series as the mask the prediction used."""
    from bonemet.cli import main
    from bonemet.data.dicom_masks import read_seg_mask
    from bonemet.data.dicom_series import series_instance_uid, write_dicom_series

    case = cohort[4]
    write_dicom_series(read_image(case.image), tmp_path / "ct_series")
    assert main(["predict", "ct_series", "--save-mask", "lesion_seg.dcm", "--threshold", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["saved_mask"] == "lesion_seg.dcm" and out["lesion_voxels"] > 0
    series = read_image(tmp_path / "ct_series")
    back = read_seg_mask(tmp_path / "lesion_seg.dcm", series, 1, case_id="ct_series", grid_tolerance_mm=TOLERANCE_MM,
                         reference_series_uid=series_instance_uid(tmp_path / "ct_series"))
    assert int(sitk.GetArrayViewFromImage(back).sum()) == out["lesion_voxels"]
    # the same mask as a label map
    assert main(["predict", "ct_series", "--save-mask", "lesion.nii.gz", "--threshold", "0"]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(read_image(tmp_path / "lesion.nii.gz")))


def test_seg_output_needs_a_dicom_series_input(cohort, cli_env, caplog, capsys):
    """Refused before any work, naming the fix."""
    from bonemet.cli import main

    assert main(["predict", str(cohort[4].image), "--save-mask", "x.dcm"]) == 1
    assert "asks for a DICOM SEG, which needs a DICOM series folder as input" in caplog.text
    assert cli_env.loaded == [] and capsys.readouterr().out == ""


# --- the registered models, read quickly ------------------------------------------------------------


@pytest.fixture
def store(cohort, classifier, tmp_path, monkeypatch):
    """A local MLflow store with both models registered (aliases staging)."""
    from bonemet.registry.pyfunc import log_classifier
    from bonemet.registry.store import MlflowTracker, register_model, set_alias

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _params_file(tmp_path, "mlruns")
    tracker = MlflowTracker("predict-test", system_metrics=False, system_metrics_interval_s=None, tracking_uri=None, store_dir=tmp_path / "mlruns")
    from bonemet.modeling.domain import fit_training_domain

    domain = fit_training_domain(classifier.pipeline, classifier.table, np.arange(len(classifier.table)) % 2,
                                 PARAMS.train.domain, seed=0)
    with tracker.run("register"):
        info = log_classifier(tracker, classifier.pipeline, classifier.feature_names, threshold=0.25,
                              model_name="logreg", domain=domain, check_rows=classifier.table)
    set_alias(tracker.client, "bonemet-classifier", "staging", register_model(tracker.client, info, "bonemet-classifier"))
    with tracker.run("segment"):
        info = tracker.log_model(BrightIsLesion(), name="model", flavor="pytorch", pip_requirements=["torch"],
                                 metadata=_metadata(), serialization_format="pickle")
    set_alias(tracker.client, "bonemet-segmenter", "staging", register_model(tracker.client, info, "bonemet-segmenter"))
    return tmp_path / "mlruns"


@pytest.mark.slow
def test_local_store_read_without_mlflow_matches_mlflow(store, classifier):
    """Alias, version and model folder as MLflow reports them; the in-process classifier answers
    what the MLflow pyfunc answers, bit for bit."""
    from bonemet.registry.loaders import load_classifier
    from bonemet.registry.local import default_tracking_uri, resolve_alias
    from bonemet.registry.store import client, load_model
    from bonemet.serving.served import ServedClassifier

    uri = default_tracking_uri(store)
    local = resolve_alias(uri, "bonemet-classifier", "staging")
    mv = client(None, store).get_model_version_by_alias("bonemet-classifier", "staging")
    assert local.version == str(mv.version) and local.run_id == mv.run_id
    assert (local.model_dir / "MLmodel").is_file()
    assert resolve_alias(uri, "bonemet-classifier", "production") is False
    assert resolve_alias("http://team-server:5000", "bonemet-classifier", "staging") is None
    assert resolve_alias(default_tracking_uri(store / "nothing"), "bonemet-classifier", "staging") is None

    fast = load_classifier("bonemet-classifier", "staging", tracking_uri=uri, store_dir=str(store))
    assert isinstance(fast, ServedClassifier) and (fast.version, fast.threshold) == ("1", 0.25)
    pyfunc = load_model(client(None, store), f"models:/bonemet-classifier/{mv.version}")
    rows = classifier.table.loc[:, fast.feature_names]
    ours = fast.predict(rows)
    theirs = pyfunc.predict(rows)
    np.testing.assert_array_equal(ours["probability_breast"].to_numpy(), theirs["probability_breast"].to_numpy())
    np.testing.assert_array_equal(ours["label"].to_numpy(), theirs["label"].to_numpy())
    assert list(ours["in_domain"]) == list(theirs["in_domain"])


def test_untrusted_pipeline_is_refused_by_the_fast_path(classifier, tmp_path):
    """The artifacts are read with the one skops trust list: a pipeline holding another module's type
    is refused before it is loaded."""
    import skops.io as sio

    from bonemet.modeling.persistence import UntrustedPipelineError
    from bonemet.serving.served import ClassifierArtifactsError, ServedClassifier

    sio.dump({"pipeline": classifier.pipeline, "extra": SimpleNamespace(x=1)}, tmp_path / "p.skops")
    (tmp_path / "meta.json").write_text(json.dumps({"feature_names": ["a"], "threshold": 0.5}))
    artifacts = {"serving": tmp_path / "p.skops", "domain": tmp_path / "p.skops", "meta": tmp_path / "meta.json"}
    with pytest.raises(UntrustedPipelineError, match="types.SimpleNamespace"):
        ServedClassifier.from_artifacts(artifacts, name="m", version="1")
    with pytest.raises(ClassifierArtifactsError, match="its artifacts lack serving, domain"):
        ServedClassifier.from_artifacts({"meta": tmp_path / "meta.json"}, name="m", version="1")


@pytest.mark.slow
def test_given_mask_path_imports_neither_torch_nor_mlflow(store, cohort, tmp_path):
    """`bonemet predict CT --mask M` in a fresh process: answered from the local store without
    importing torch, MONAI or MLflow (their imports are most of the start-up)."""
    import subprocess
    import sys

    script = ("import sys, json\n"
              "from bonemet.cli import main\n"
              "code = main(sys.argv[1:])\n"
              "heavy = sorted(m for m in ('torch', 'mlflow', 'monai') if m in sys.modules)\n"
              "sys.stderr.write('HEAVY=' + json.dumps(heavy) + '\\n')\n"
              "sys.exit(code)\n")
    case = cohort[3]
    proc = subprocess.run([sys.executable, "-c", script, "predict", str(case.image), "--mask", str(case.manual_mask)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=[]" in proc.stderr, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "classified" and out["models"]["classifier"] == {"name": "bonemet-classifier",
                                                                              "version": "1"}
    assert out["threshold"] == 0.25 and "load_models" in out["seconds"]


# --- the README's prediction commands, as written -------------------------------------------------

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_readme_predict_command_parses():
    import shlex

    from bonemet.cli import build_parser

    lines = [line.split("#")[0].strip() for line in README.splitlines() if line.startswith(".venv/bin/bonemet predict")]
    assert len(lines) >= 8
    parser = build_parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert args.command == "predict", line
        assert (args.image is None) != (args.input is None), line  # one CT, or a batch
        assert (args.input is None) == (args.output is None), line


def test_the_readme_batch_manifest_works_as_written(cohort, cli_env, capsys, tmp_path):
    """The bring-your-own section's prediction manifest, made from synthetic cases (a label map, a DICOM
    series with its RTSTRUCT, a DICOM series to segment), predicted by the README's command."""
    import io
    import re

    from bonemet.cli import main
    from bonemet.data.dicom_masks import write_rtstruct
    from bonemet.data.dicom_series import write_dicom_series

    section = README[README.index("### Predicting new CTs in bulk"):README.index("## Tracking, registry, serving")]
    block = re.findall(r"```csv\n(.*?)```", section, flags=re.S)[0]
    manifest = pd.read_csv(io.StringIO(block), dtype=str, keep_default_na=False)
    for row, case in zip(manifest.to_dict("records"), cohort, strict=False):
        image, mask = read_image(case.image), read_mask(case.manual_mask, label=LABEL)
        image_path = tmp_path / "new" / row["image"]
        image_path.parent.mkdir(parents=True, exist_ok=True)
        if image_path.name.endswith(".nii.gz"):
            write_image(image, image_path)
        else:
            write_dicom_series(image, image_path)
            mask.CopyInformation(read_image(image_path))
        if row["mask"].endswith("_rtstruct.dcm"):
            write_rtstruct(mask, image_path, tmp_path / "new" / row["mask"], row["roi"], algorithm_type="MANUAL",
                           grid_tolerance_mm=TOLERANCE_MM)
        elif row["mask"]:
            write_image(sitk.Cast(mask * LABEL, sitk.sitkUInt8), tmp_path / "new" / row["mask"])
    (tmp_path / "new" / "predict.csv").write_text(block, encoding="utf-8")
    command = re.findall(r"\.venv/bin/bonemet (predict -i new/predict\.csv -o \S+)", section)[0].split()
    assert main(command + ["--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["cases"] == 3
    import csv

    with open(tmp_path / "new" / "results.csv", newline="") as fh:
        rows = {r["case_id"]: r for r in csv.DictReader(fh)}
    assert [rows[c]["mask_source"] for c in manifest["case_id"]] == ["given", "given", "auto"]
    assert all(r["status"] != "failed" for r in rows.values()), rows
    assert rows["N002"]["mask"].endswith("N002_rtstruct.dcm")
    assert int(rows["N002"]["lesion_voxels"]) == int(sitk.GetArrayViewFromImage(
        read_mask(cohort[1].manual_mask, label=LABEL)).sum())


def test_batch_with_a_missing_model_fails_before_any_case(cohort, cli_env, monkeypatch, caplog, tmp_path):
    """A model that cannot be loaded is the command's error (exit 1, one line), not a failed row per case."""
    import bonemet.registry.loaders as loaders
    from bonemet.cli import main

    def missing(name, alias, **kw):
        raise loaders.ModelNotFoundError(f"no registered model '{name}@{alias}'")

    monkeypatch.setattr(loaders, "load_segmenter", missing)
    folder = tmp_path / "cts"
    folder.mkdir()
    write_image(read_image(cohort[0].image), folder / "a.nii.gz")
    assert main(["predict", "-i", str(folder), "-o", "r.csv", "--no-progress"]) == 1
    assert "no registered model 'bonemet-segmenter@staging'" in caplog.text and not (tmp_path / "r.csv").exists()

