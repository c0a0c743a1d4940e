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

from bonemet.config import load_specs
from bonemet.data.io import ImageReadError, read_image, read_mask, same_grid, write_image
from bonemet.data.masks import mask_volume_ml
from bonemet.radiomics import build_settings
from bonemet.segmentation.inference import CaseInferenceError, InferenceSettings
from bonemet.serving.checks import check_feature_frame
from bonemet.serving.predict import MissuSegmenter, PredictError, case_id_from_path, predict_case

PARAMS = load_specs(Path(__file__).resolve().parents[1] / "params.yaml")
LABEL = PARAMS.data.mask_label
TOLERANCE_MM = PARAMS.validation.grid_tolerance_mm
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
    """predict_case with params.yaml's settings (mask label, grid tolerance, register.threshold)."""
    return predict_case(image, mask, segmenter=segmenter, classifier=classifier, radiomics_settings=SETTINGS,
                        mask_label=LABEL, threshold=kw.pop("threshold", 0.5),
                        grid_tolerance_mm=kw.pop("grid_tolerance_mm", TOLERANCE_MM), **kw)


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
    assert segmenter.calls == 1 and out["mask_source"] == "missu"
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
    """MissuSegmenter: preprocessing (resample, crop) and mapping back on an oblique grid."""
    case = cohort[1]
    image = _oblique(read_image(case.image))
    mask = _oblique(read_mask(case.manual_mask, label=LABEL))
    write_image(image, tmp_path / "oblique.nrrd", compress=False)
    write_image(mask, tmp_path / "oblique_mask.nrrd", compress=False)
    given = _predict(tmp_path / "oblique.nrrd", tmp_path / "oblique_mask.nrrd", classifier=classifier)
    voxels = int(sitk.GetArrayViewFromImage(mask).sum())
    assert given["lesion_volume_ml"] == pytest.approx(voxels * 0.9 * 1.7 * 3.1 / 1000)

    segmenter = MissuSegmenter.from_metadata(BrightIsLesion(), _metadata(), device="cpu", name="bonemet-missu",
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
    seg = MissuSegmenter.from_metadata(BrightIsLesion(), meta, device="cpu", name="bonemet-missu", version="2")
    assert seg.settings == mirrored and seg.settings.preprocess == PREPROCESS
    assert seg.settings.roi_size == (16, 16, 16) and seg.settings.inference.mirror_axes == (0, 2)
    assert (seg.settings.threshold, seg.settings.largest_component) == (0.4, False)
    assert (seg.name, seg.version, seg.device) == ("bonemet-missu", "2", "cpu")
    # a model logged without its settings (an older bonemet) is refused, naming the model and the fix
    old = {k: v for k, v in meta.items() if k not in ("preprocess", "inference")}
    with pytest.raises(CaseInferenceError, match=r"bonemet-missu version 2: its metadata lacks preprocess, "
                                                 r"inference .*run `bonemet segment` again"):
        MissuSegmenter.from_metadata(BrightIsLesion(), old, device="cpu", name="bonemet-missu", version="2")
    bad = {**meta, "inference": {**meta["inference"], "mirror_axes": [3]}}
    with pytest.raises(CaseInferenceError, match=r"invalid: inference\.mirror_axes: must be distinct spatial axes"):
        MissuSegmenter.from_metadata(BrightIsLesion(), bad, device="cpu", name="bonemet-missu", version="2")
    typo = {**meta, "preprocess": {**meta["preprocess"], "hu_windw": [0, 1]}}
    with pytest.raises(CaseInferenceError, match=r"preprocess\.hu_windw: unknown key; did you mean hu_window\?"):
        MissuSegmenter.from_metadata(BrightIsLesion(), typo, device="cpu", name="bonemet-missu", version="2")


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
    with pytest.raises(PredictError, match="no lesion found"):
        _predict(case.image, segmenter=SphereSegmenter(empty=True), classifier=classifier)
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

    def fake_classifier(name, alias):
        env.loaded.append((name, alias))
        classifier.threshold = 0.5
        return classifier

    def fake_segmenter(name, alias, device="cpu"):
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
    assert out["mask_source"] == "missu" and out["alias"] == "production"
    assert out["models"]["segmenter"] == {"name": "bonemet-missu", "version": "5"}
    assert cli_env.loaded == [("bonemet-classifier", "production"), ("bonemet-missu", "production")]
    assert (tmp_path / "m.nii.gz").is_file()
    # the command segments as the library does with the model's settings
    direct = MissuSegmenter(BrightIsLesion(), INFERENCE, "cpu", "bonemet-missu", "5").segment(
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
    assert error.getMessage().startswith("segmentation model bonemet-missu version 5: its metadata lacks preprocess")
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
              "L.load_segmenter = lambda name, alias, device='cpu': (None, None, '1')\n"
              "L.load_classifier = lambda name, alias: None\n"
              "from bonemet.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "predict", str(cohort[0].image)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr, proc.stderr
    assert "TypeError" in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_command_with_models_from_a_real_mlflow_store(cohort, classifier, tmp_path, monkeypatch, capsys):
    """Both models registered in a local MLflow store, loaded by alias through bonemet.registry.loaders."""
    from bonemet.cli import main
    from bonemet.registry.pyfunc import log_classifier
    from bonemet.registry.store import MlflowTracker, register_model, set_alias

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _params_file(tmp_path, "mlruns")
    tracker = MlflowTracker("predict-test", tracking_uri=None, store_dir=tmp_path / "mlruns")
    from bonemet.modeling.domain import fit_training_domain

    domain = fit_training_domain(classifier.pipeline, classifier.table, np.arange(len(classifier.table)) % 2,
                                 PARAMS.train.domain, seed=0)
    with tracker.run("register") as run_id:
        log_classifier(classifier.pipeline, classifier.feature_names, threshold=0.25, model_name="logreg",
                       domain=domain, check_rows=classifier.table)
    set_alias("bonemet-classifier", "staging", register_model(run_id, "classifier", "bonemet-classifier"))
    with tracker.run("segment") as run_id:
        tracker.log_model(BrightIsLesion(), name="model", flavor="pytorch", pip_requirements=["torch"],
                          metadata=_metadata(), serialization_format="pickle")
    set_alias("bonemet-missu", "staging", register_model(run_id, "model", "bonemet-missu"))

    case = cohort[2]
    assert main(["predict", str(case.image)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["models"] == {"classifier": {"name": "bonemet-classifier", "version": "1"},
                             "segmenter": {"name": "bonemet-missu", "version": "1"}}
    assert out["threshold"] == 0.25 and out["mask_source"] == "missu"  # the registered threshold
    assert isinstance(out["in_domain"], bool) and isinstance(out["domain_reasons"], list)
    # the settings travelled with the model: the same mask as the library with INFERENCE
    direct = MissuSegmenter(BrightIsLesion(), INFERENCE, "cpu", "bonemet-missu", "1").segment(
        read_image(case.image), case.case_id)
    assert out["lesion_voxels"] == int(sitk.GetArrayViewFromImage(direct).sum()) > 0
    assert main(["predict", str(case.image), "--alias", "production"]) == 1  # no such alias
    assert capsys.readouterr().out == ""
