"""Prediction from one CT: lesion mask (given, or MISSU), PyRadiomics features, classifier.

The models are passed in as objects, so this module never touches MLflow:

* a *segmenter* has ``segment(image_hu, case_id) -> mask``: a uint8 0/1 lesion mask on the
  CT's own grid. :class:`MissuSegmenter` wraps a trained network and the preprocessing and
  sliding-window settings it was trained with (:func:`bonemet.segmentation.inference.segment_ct`
  resamples, crops and normalises the CT, whatever its spacing and orientation, and maps the
  lesion probability back onto the original grid);
* a *classifier* has ``predict(features: DataFrame) -> DataFrame`` with a ``probability_breast``
  column (the registered ``bonemet-classifier`` pyfunc, see
  :mod:`bonemet.registry.loaders`); optional attributes ``feature_names``, ``name`` and
  ``version`` are used when present.

Features come from the CT in HU (never the normalised network input) with the PyRadiomics
settings of training, so the feature names match the classifier's columns.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import SimpleITK as sitk

from bonemet.data.io import IMAGE_SUFFIXES, read_image, read_mask, same_grid, write_image
from bonemet.data.masks import mask_volume_ml
from bonemet.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.segmentation.inference import InferenceSettings

log = logging.getLogger(__name__)

#: ``mask_source`` values in the result.
MASK_GIVEN = "given"
MASK_MISSU = "missu"
_SHOW = 5


class PredictError(UserError, ValueError):
    """Prediction for a CT failed; the message names the case, the file, what was expected and found."""


class Segmenter(Protocol):
    """Anything that segments a CT (HU) into a uint8 0/1 lesion mask on the CT's grid."""

    def segment(self, image_hu: sitk.Image, case_id: str) -> sitk.Image: ...


class Classifier(Protocol):
    """Anything that maps feature rows to a frame with a ``probability_breast`` column."""

    def predict(self, features: pd.DataFrame) -> pd.DataFrame: ...


@dataclass
class MissuSegmenter:
    """A trained segmentation network with the settings it was trained and validated with.

    Attributes:
        model: the network (``torch.nn.Module``), returning logits ``(B, 2, D, H, W)``.
        settings: preprocessing, sliding window, mirroring, threshold and postprocessing, as
            logged with the registered model (see
            :class:`bonemet.segmentation.inference.InferenceSettings`).
        device: torch device ("cpu" or "cuda").
        name, version: registered model name and version, reported in the result.
    """

    model: Any
    settings: InferenceSettings
    device: str
    name: str
    version: str | None

    @classmethod
    def from_metadata(cls, model: Any, metadata: Mapping[str, Any], *, device: str, name: str,
                      version: str | None) -> MissuSegmenter:
        """Build from the metadata logged with the model by ``bonemet segment``.

        Raises:
            CaseInferenceError: the metadata lacks the inference settings or holds invalid ones.
        """
        from bonemet.segmentation.inference import InferenceSettings

        where = f"segmentation model {name} version {version}"
        return cls(model, InferenceSettings.from_metadata(metadata, where), device, name, version)

    def segment(self, image_hu: sitk.Image, case_id: str) -> sitk.Image:
        """uint8 0/1 lesion mask on ``image_hu``'s grid (preprocess, sliding window, map back)."""
        from bonemet.segmentation.inference import segment_ct

        return segment_ct(self.model, image_hu, self.settings, device=self.device, case_id=case_id)


@dataclass
class CaseInputs:
    """A CT read for prediction: HU image, and the binary lesion mask when one was given."""

    case_id: str
    image_path: Path
    image: sitk.Image
    mask_path: Path | None = None
    mask: sitk.Image | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def case_id_from_path(path: str | Path) -> str:
    """The case id of an input: file name without its image suffix, or the DICOM folder's name."""
    path = Path(path)
    name = path.name
    if not path.is_dir():
        for suffix in sorted(IMAGE_SUFFIXES + (".dcm",), key=len, reverse=True):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)] or name
    return name


def load_inputs(
    image_path: str | Path,
    mask_path: str | Path | None = None,
    *,
    mask_label: int,
    grid_tolerance_mm: float,
) -> CaseInputs:
    """Read the CT (NIfTI, NRRD, MetaImage or a DICOM series folder) and the optional mask.

    Done before any model is loaded so that a bad file fails fast.

    Args:
        image_path: the CT in HU (DICOM rescale slope/intercept applied by the reader).
        mask_path: optional label map on the CT's grid; voxels equal to ``mask_label`` are lesion.
        mask_label: lesion value in the mask file (``data.mask_label``).
        grid_tolerance_mm: how far (mm) the mask's spacing and origin may differ from the CT's
            (``validate.grid_tolerance_mm``).

    Raises:
        bonemet.data.io.ImageReadError: a file is missing, unreadable, truncated or not an image.
        PredictError: the mask is not on the CT's grid, or holds no lesion voxel.
    """
    image_path = Path(image_path)
    case_id = case_id_from_path(image_path)
    start = time.perf_counter()
    image = read_image(image_path, case_id=case_id)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PredictError(
            f"case '{case_id}': {image_path}: expected a 3D single-channel CT, found "
            f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    inputs = CaseInputs(case_id=case_id, image_path=image_path, image=image)
    if mask_path is not None:
        mask_path = Path(mask_path)
        mask = read_mask(mask_path, label=mask_label, case_id=case_id)
        ok, reason = same_grid(image, mask, tol_mm=grid_tolerance_mm)
        if not ok:
            raise PredictError(
                f"case '{case_id}': mask {mask_path} is not on the grid of the CT {image_path}: mask {reason} "
                "(expected the CT's size, spacing, origin and direction)"
            )
        mask.CopyInformation(image)  # within tolerance: the CT's exact geometry from here on
        _require_lesion(mask, case_id, f"the mask {mask_path} has no voxel with label {mask_label}")
        inputs.mask_path, inputs.mask = mask_path, mask
    inputs.seconds["read"] = time.perf_counter() - start
    return inputs


def _require_lesion(mask: sitk.Image, case_id: str, why: str) -> None:
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise PredictError(f"case '{case_id}': no lesion found: {why}")


def _binary_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The PyRadiomics settings for a binary 0/1 mask (the label only picks the lesion voxels)."""
    out = copy.deepcopy({key: dict(value or {}) for key, value in settings.items()})
    out.setdefault("setting", {})["label"] = 1
    return out


def _select_features(features: Mapping[str, float], classifier: Any, case_id: str) -> pd.DataFrame:
    """One-row frame of the classifier's feature columns (all features when it names none)."""
    frame = pd.DataFrame([dict(features)])
    names = getattr(classifier, "feature_names", None)
    if not names:
        return frame
    names = list(names)
    missing = [n for n in names if n not in frame.columns]
    if missing:
        more = f" and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
        raise PredictError(
            f"case '{case_id}': the classifier expects {len(names)} features, {len(missing)} of which the "
            f"radiomics settings did not produce ({', '.join(missing[:_SHOW])}{more}); found {frame.shape[1]} "
            "features: use the PyRadiomics settings the classifier was trained with"
        )
    return frame.loc[:, names]


def write_mask(mask: sitk.Image, path: str | Path) -> Path:
    """Write a mask atomically (format by suffix, e.g. ``.nii.gz``, ``.nrrd``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_file = Path(tmp) / path.name  # same name: the writer picks the format from the suffix
        write_image(mask, tmp_file)
        os.replace(tmp_file, path)
    return path


def _model_ref(model: Any, default_name: str) -> dict[str, str | None]:
    version = getattr(model, "version", None)
    return {"name": str(getattr(model, "name", None) or default_name), "version": None if version is None else str(version)}


def predict_inputs(
    inputs: CaseInputs,
    *,
    segmenter: Segmenter | None,
    classifier: Classifier,
    radiomics_settings: Mapping[str, Any],
    threshold: float,
    grid_tolerance_mm: float,
    save_mask: str | Path | None = None,
) -> dict[str, Any]:
    """Predict for a CT already read by :func:`load_inputs` (see :func:`predict_case`)."""
    case_id, image = inputs.case_id, inputs.image
    seconds = dict(inputs.seconds)
    if not 0.0 <= float(threshold) <= 1.0:
        raise PredictError(f"threshold must be a probability in [0, 1], found {threshold}")
    if inputs.mask is not None:
        mask, source = inputs.mask, MASK_GIVEN
    else:
        if segmenter is None:
            raise PredictError(f"case '{case_id}': no mask given and no segmentation model to make one")
        start = time.perf_counter()
        mask = segmenter.segment(image, case_id)
        seconds["segment"] = time.perf_counter() - start
        ok, reason = same_grid(image, mask, tol_mm=grid_tolerance_mm)
        if not ok:
            raise PredictError(
                f"case '{case_id}': the segmentation model returned a mask off the CT's grid ({reason})"
            )
        mask = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
        mask.CopyInformation(image)
        source = MASK_MISSU
        _require_lesion(
            mask, case_id, f"the segmentation model {_model_ref(segmenter, 'segmenter')['name']} found no lesion "
            f"voxel in {inputs.image_path} (give a mask with --mask)"
        )
    saved = None
    if save_mask is not None:
        saved = str(write_mask(mask, save_mask))
        log.info("case '%s': lesion mask written to %s", case_id, saved)

    from bonemet.radiomics import extract_features

    start = time.perf_counter()
    features = extract_features(image, mask, _binary_settings(radiomics_settings), case_id,
                                grid_tolerance_mm=grid_tolerance_mm)
    seconds["features"] = time.perf_counter() - start
    frame = _select_features(features, classifier, case_id)

    start = time.perf_counter()
    answer = classifier.predict(frame)
    seconds["classify"] = time.perf_counter() - start
    if not isinstance(answer, pd.DataFrame) or "probability_breast" not in answer.columns or len(answer) != 1:
        raise PredictError(
            f"case '{case_id}': the classifier must return one row with a 'probability_breast' column, "
            f"found {type(answer).__name__} {getattr(answer, 'shape', '')}"
        )
    probability = float(answer["probability_breast"].iloc[0])
    if not np.isfinite(probability):
        raise PredictError(f"case '{case_id}': the classifier returned a non-finite probability ({probability})")
    from bonemet.modeling.domain import case_domain

    # in_domain and domain_reasons: the classifier's features and lesion volume, the CT's spacing and HU
    domain = case_domain(answer.iloc[0], getattr(classifier, "domain", None), image)
    return {
        "input": str(inputs.image_path),
        "case_id": case_id,
        "probability_breast": probability,
        "label": int(probability >= float(threshold)),
        "threshold": float(threshold),
        **domain,
        "lesion_volume_ml": mask_volume_ml(mask),
        "lesion_voxels": int(np.count_nonzero(sitk.GetArrayViewFromImage(mask))),
        "mask_source": source,
        "mask": str(inputs.mask_path) if inputs.mask_path is not None else None,
        "saved_mask": saved,
        "n_features": int(frame.shape[1]),
        "models": {
            "classifier": _model_ref(classifier, "classifier"),
            "segmenter": _model_ref(segmenter, "segmenter") if source == MASK_MISSU else None,
        },
        "image": {
            "size": list(image.GetSize()),
            "spacing_mm": [float(s) for s in image.GetSpacing()],
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def predict_case(
    image_path: str | Path,
    mask_path: str | Path | None = None,
    *,
    segmenter: Segmenter | None,
    classifier: Classifier,
    radiomics_settings: Mapping[str, Any],
    mask_label: int,
    threshold: float,
    grid_tolerance_mm: float,
    save_mask: str | Path | None = None,
) -> dict[str, Any]:
    """Probability that the bone metastasis in a CT comes from breast cancer.

    Args:
        image_path: CT in HU: NIfTI, NRRD, MetaImage file or a folder with one DICOM series;
            any spacing and orientation.
        mask_path: optional lesion label map on the CT's grid; without it ``segmenter`` makes one.
        segmenter: see :class:`Segmenter` (may be None when a mask is given).
        classifier: see :class:`Classifier`.
        radiomics_settings: PyRadiomics settings of training (``imageType``, ``featureClass``,
            ``setting``; see :func:`bonemet.radiomics.build_settings`).
        mask_label: lesion value in the given mask file.
        threshold: probability of breast origin at or above which the label is 1.
        save_mask: where to write the lesion mask used (uint8 0/1, on the CT's grid).
        grid_tolerance_mm: how far (mm) a given mask's spacing and origin may differ from the CT's.

    Returns:
        JSON-serialisable dict: ``input``, ``case_id``, ``probability_breast``, ``label``,
        ``threshold``, ``lesion_volume_ml`` (ml), ``lesion_voxels``, ``mask_source``
        ("given" | "missu"), ``mask``, ``saved_mask``, ``n_features``, ``models`` (name and
        version of the classifier and of the segmenter when used), ``image`` (size, spacing in
        mm) and ``seconds`` per step.

    Raises:
        bonemet.data.io.ImageReadError: a file is missing, unreadable or not an image.
        PredictError: mask off the CT's grid, no lesion found, features not matching the classifier.
        ValueError: other failures of segmentation (CaseInferenceError) or extraction (BadMaskError).
    """
    inputs = load_inputs(image_path, mask_path, mask_label=mask_label, grid_tolerance_mm=grid_tolerance_mm)
    return predict_inputs(
        inputs,
        segmenter=segmenter,
        classifier=classifier,
        radiomics_settings=radiomics_settings,
        threshold=threshold,
        grid_tolerance_mm=grid_tolerance_mm,
        save_mask=save_mask,
    )
