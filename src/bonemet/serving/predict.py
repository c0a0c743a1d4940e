"""Prediction from one CT: lesion mask (given, or MISSU), PyRadiomics features, classifier.

The models are passed in as objects, so this module never touches MLflow:

* a *segmenter* has ``segment(image_hu, case_id) -> mask``: a uint8 0/1 lesion mask on the
  CT's own grid. :class:`NetworkSegmenter` wraps a trained network and the preprocessing and
  sliding-window settings it was trained with (:func:`bonemet.segmentation.inference.segment_ct`
  resamples, crops and normalises the CT, whatever its spacing and orientation, and maps the
  lesion probability back onto the original grid);
* a *classifier* has ``predict(features: DataFrame) -> DataFrame`` with a ``probability_breast``
  column (the registered ``bonemet-classifier`` pyfunc, see
  :mod:`bonemet.registry.loaders`); optional attributes ``feature_names``, ``name`` and
  ``version`` are used when present.

Features come from the CT in HU (never the normalised network input) with the PyRadiomics
settings of training, so the feature names match the classifier's columns.

Every result says what it is (``status``, with a ``reason`` unless classified):

* ``classified``: a lesion was found (or given) and classified: ``probability_breast`` and ``label``;
* ``no_lesion``: the segmentation model found no lesion voxel: no probability (``null``);
* ``lesion_too_small``: the lesion is smaller than the smallest lesion the pipeline is validated
  for (``validate.lesion_volume_ml[0]``): its features would not describe a lesion, so no
  probability either (a given mask too: the rule is about the classifier, not the segmenter);
* ``failed`` (batch prediction only, :func:`failed_result`): the case could not be predicted; the
  reason is the error.

``in_domain`` and ``domain_reasons`` come from the classifier's answer when it gives them (the
training-domain check of the registered model); until it does they are ``null`` and ``[]``.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import SimpleITK as sitk

from bonemet.data.io import IMAGE_SUFFIXES, read_image, read_mask, same_grid, write_image
from bonemet.data.masks import mask_volume_ml
from bonemet.errors import UserError
from bonemet.utils import some

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.segmentation.inference import InferenceSettings

log = logging.getLogger(__name__)

#: ``mask_source`` values in the result.
MASK_GIVEN = "given"
MASK_AUTO = "auto"
#: ``status`` values in the result.
CLASSIFIED = "classified"
NO_LESION = "no_lesion"
LESION_TOO_SMALL = "lesion_too_small"
FAILED = "failed"
#: ``--save-mask`` paths ending so are written as DICOM SEG over the input's series.
SEG_SUFFIX = ".dcm"


class PredictError(UserError, ValueError):
    """Prediction for a CT failed; the message names the case, the file, what was expected and found."""


class Segmenter(Protocol):
    """Anything that segments a CT (HU) into a uint8 0/1 lesion mask on the CT's grid."""

    def segment(self, image_hu: sitk.Image, case_id: str) -> sitk.Image: ...


class Classifier(Protocol):
    """Anything that maps feature rows to a frame with a ``probability_breast`` column."""

    def predict(self, features: pd.DataFrame) -> pd.DataFrame: ...


@dataclass
class NetworkSegmenter:
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
                      version: str | None) -> NetworkSegmenter:
        """Build from the metadata logged with the model by ``bonemet segment``.

        Raises:
            CaseInferenceError: the metadata lacks the inference settings or holds invalid ones.
        """
        from bonemet.segmentation.inference import InferenceSettings

        where = f"segmentation model {name} version {version}"
        return cls(model, InferenceSettings.from_metadata(metadata, where), device, name, version)

    last_seconds: dict[str, float] = field(default_factory=dict)

    def segment(self, image_hu: sitk.Image, case_id: str) -> sitk.Image:
        """uint8 0/1 lesion mask on ``image_hu``'s grid (preprocess, sliding window, map back);
        the seconds of each step are left in :attr:`last_seconds`."""
        from bonemet.segmentation.inference import segment_ct

        self.last_seconds = {}
        return segment_ct(self.model, image_hu, self.settings, device=self.device, case_id=case_id,
                          seconds=self.last_seconds)


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
    case_id: str | None = None,
    roi: str | None = None,
    seg_segment: int | str | None = None,
) -> CaseInputs:
    """Read the CT (NIfTI, NRRD, MetaImage or a DICOM series folder) and the optional mask.

    Done before any model is loaded so that a bad file fails fast.

    Args:
        image_path: the CT in HU (DICOM rescale slope/intercept applied by the reader).
        mask_path: optional lesion mask: a label map on the CT's grid (voxels equal to
            ``mask_label`` are lesion), or a DICOM RTSTRUCT (structure ``roi``) or SEG
            (``seg_segment``: number or label) drawn on the CT.
        mask_label: lesion value in a label map (``data.mask_label``).
        grid_tolerance_mm: how far (mm) the mask's spacing and origin may differ from the CT's
            (``validate.grid_tolerance_mm``).
        case_id: the case's id (default: from the image's file or folder name).
        roi, seg_segment: which structure of an RTSTRUCT / SEG mask is the lesion.

    Raises:
        bonemet.data.io.ImageReadError: a file is missing, unreadable, truncated or not an image
            (a DICOM mask that cannot be used is a ``MaskFormatError``, one of these).
        PredictError: the mask is not on the CT's grid, or holds no lesion voxel.
    """
    image_path = Path(image_path)
    case_id = case_id or case_id_from_path(image_path)
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
        if mask_path.is_file() and not mask_path.name.lower().endswith(IMAGE_SUFFIXES):
            # maybe a DICOM RTSTRUCT or SEG (pydicom is imported only for these)
            from bonemet.data.dicom_masks import read_lesion_mask

            mask = read_lesion_mask(mask_path, image, label=mask_label, roi=roi, seg_segment=seg_segment, case_id=case_id,
                                    grid_tolerance_mm=grid_tolerance_mm, reference_image_path=image_path)
        else:
            mask = read_mask(mask_path, label=mask_label, case_id=case_id)
            ok, reason = same_grid(image, mask, tol_mm=grid_tolerance_mm)
            if not ok:
                raise PredictError(
                    f"case '{case_id}': mask {mask_path} is not on the grid of the CT {image_path}: mask {reason} "
                    "(expected the CT's size, spacing, origin and direction)"
                )
            mask.CopyInformation(image)  # within tolerance: the CT's exact geometry from here on
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            what = f"label {mask_label}" if roi is None and seg_segment is None else f"structure {roi or seg_segment}"
            raise PredictError(f"case '{case_id}': no lesion found: the mask {mask_path} has no voxel with {what}")
        inputs.mask_path, inputs.mask = mask_path, mask
    inputs.seconds["read"] = time.perf_counter() - start
    return inputs


def check_save_mask(save_mask: str | Path | None, image_path: str | Path, case_id: str) -> None:
    """Refuse a ``--save-mask`` path that cannot be written for this input, before any work.

    A path ending in ``.dcm`` is a DICOM SEG, which references the slices it was drawn on: the
    input must then be a DICOM series folder.
    """
    if save_mask is not None and str(save_mask).lower().endswith(SEG_SUFFIX) and not Path(image_path).is_dir():
        raise PredictError(
            f"case '{case_id}': --save-mask {save_mask} asks for a DICOM SEG, which needs a DICOM series folder as "
            f"input; {image_path} is a file: save as .nii.gz or .nrrd instead"
        )


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
        raise PredictError(
            f"case '{case_id}': the classifier expects {len(names)} features, {len(missing)} of which the "
            f"radiomics settings did not produce ({some(missing)}); found {frame.shape[1]} "
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


def save_lesion_mask(mask: sitk.Image, path: str | Path, inputs: CaseInputs, *, source: str,
                     grid_tolerance_mm: float) -> Path:
    """Write the mask used for a case: a DICOM SEG over the input series when ``path`` ends in
    ``.dcm`` (the input is then a DICOM series folder: :func:`predict_inputs` checked that before
    any work, with :func:`check_save_mask`), else a uint8 0/1 label map on the CT's grid."""
    if str(path).lower().endswith(SEG_SUFFIX):
        from bonemet.data.dicom_masks import write_seg

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return write_seg(mask, inputs.image_path, path, algorithm_type="AUTOMATIC" if source == MASK_AUTO else "MANUAL",
                         grid_tolerance_mm=grid_tolerance_mm)
    return write_mask(mask, path)


def _model_ref(model: Any, default_name: str) -> dict[str, str | None]:
    version = getattr(model, "version", None)
    return {"name": str(getattr(model, "name", None) or default_name), "version": None if version is None else str(version)}


def domain_fields(answer: pd.DataFrame | None, classifier: Any, image: sitk.Image) -> dict[str, Any]:
    """``in_domain`` and ``domain_reasons`` of a result (:func:`bonemet.modeling.domain.case_domain`):
    the classifier's verdict on the features and lesion volume (its answer's ``domain_reasons``)
    and the CT's spacing and intensities against its training domain (``classifier.domain``).
    Without an answer (no lesion, too small) only the CT is checked. ``None`` and ``[]`` when the
    classifier knows no domain."""
    domain = getattr(classifier, "domain", None)
    answered = answer is not None and "domain_reasons" in answer.columns
    if domain is None and not answered:
        return {"in_domain": None, "domain_reasons": []}
    from bonemet.modeling.domain import case_domain

    return case_domain(answer.iloc[0] if answered else {}, domain, image)


def failed_result(case_id: str, image_path: str | Path, reason: str) -> dict[str, Any]:
    """The result of a case that could not be predicted (batch prediction): same fields, no answer."""
    return {
        "case_id": case_id, "input": str(image_path), "status": FAILED, "reason": reason,
        "probability_breast": None, "label": None, "threshold": None, "in_domain": None, "domain_reasons": [],
        "lesion_volume_ml": None, "lesion_voxels": None, "min_lesion_ml": None, "mask_source": None, "mask": None,
        "saved_mask": None, "n_features": None, "models": {"classifier": None, "segmenter": None},
        "image": {"size": None, "spacing_mm": None}, "seconds": {},
    }


def _segment(inputs: CaseInputs, segmenter: Segmenter | None, grid_tolerance_mm: float,
             seconds: dict[str, float]) -> sitk.Image:
    """The segmenter's lesion mask on the CT's grid (uint8 0/1); its seconds added to ``seconds``."""
    case_id, image = inputs.case_id, inputs.image
    if segmenter is None:
        raise PredictError(f"case '{case_id}': no mask given and no segmentation model to make one")
    start = time.perf_counter()
    mask = segmenter.segment(image, case_id)
    seconds["segment"] = time.perf_counter() - start
    seconds.update({f"segment_{k}": v for k, v in (getattr(segmenter, "last_seconds", None) or {}).items()})
    ok, reason = same_grid(image, mask, tol_mm=grid_tolerance_mm)
    if not ok:
        raise PredictError(f"case '{case_id}': the segmentation model returned a mask off the CT's grid ({reason})")
    mask = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    mask.CopyInformation(image)
    return mask


def _classify(image: sitk.Image, mask: sitk.Image, case_id: str, classifier: Classifier,
              radiomics_settings: Mapping[str, Any], grid_tolerance_mm: float,
              seconds: dict[str, float]) -> tuple[float, int, pd.DataFrame]:
    """``(probability, n_features, answer)``: the lesion's features through the classifier."""
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
    return probability, int(frame.shape[1]), answer


def predict_inputs(
    inputs: CaseInputs,
    *,
    segmenter: Segmenter | None,
    classifier: Classifier,
    radiomics_settings: Mapping[str, Any],
    threshold: float,
    grid_tolerance_mm: float,
    min_lesion_ml: float,
    save_mask: str | Path | None = None,
) -> dict[str, Any]:
    """Predict for a CT already read by :func:`load_inputs` (see :meth:`Predictor.predict_case`)."""
    case_id, image = inputs.case_id, inputs.image
    seconds = dict(inputs.seconds)
    if not 0.0 <= float(threshold) <= 1.0:
        raise PredictError(f"threshold must be a probability in [0, 1], found {threshold}")
    check_save_mask(save_mask, inputs.image_path, case_id)
    if inputs.mask is not None:
        mask, source = inputs.mask, MASK_GIVEN
    else:
        mask, source = _segment(inputs, segmenter, grid_tolerance_mm, seconds), MASK_AUTO
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    volume = mask_volume_ml(mask)
    status, reason = CLASSIFIED, None
    segmenter_ref = _model_ref(segmenter, "segmenter") if source == MASK_AUTO else None
    if voxels == 0:  # only a segmenter's mask gets here: an empty given mask is refused when read
        status = NO_LESION
        reason = (f"no lesion found: the segmentation model {segmenter_ref['name']} version {segmenter_ref['version']} "
                  f"marked no voxel of {inputs.image_path} (give a mask with --mask to classify a lesion)")
    elif volume < float(min_lesion_ml):
        status = LESION_TOO_SMALL
        reason = (f"lesion too small to classify: {volume:.3g} mL ({voxels} voxels, {source} mask), below the "
                  f"{min_lesion_ml:g} mL the pipeline is validated for (validate.lesion_volume_ml)")
    saved = None
    if save_mask is not None and voxels:
        saved = str(save_lesion_mask(mask, save_mask, inputs, source=source, grid_tolerance_mm=grid_tolerance_mm))
        log.info("case '%s': lesion mask written to %s", case_id, saved)
    elif save_mask is not None:
        log.info("case '%s': no lesion, so no mask written to %s", case_id, save_mask)

    probability, n_features, answer = None, None, None
    if status == CLASSIFIED:
        probability, n_features, answer = _classify(image, mask, case_id, classifier, radiomics_settings,
                                                    grid_tolerance_mm, seconds)
    return {
        "case_id": case_id,
        "input": str(inputs.image_path),
        "status": status,
        "reason": reason,
        "probability_breast": probability,
        "label": None if probability is None else int(probability >= float(threshold)),
        "threshold": float(threshold),
        **domain_fields(answer, classifier, image),
        "lesion_volume_ml": volume,
        "lesion_voxels": voxels,
        "min_lesion_ml": float(min_lesion_ml),
        "mask_source": source,
        "mask": str(inputs.mask_path) if inputs.mask_path is not None else None,
        "saved_mask": saved,
        "n_features": n_features,
        "models": {"classifier": _model_ref(classifier, "classifier"), "segmenter": segmenter_ref},
        "image": {
            "size": list(image.GetSize()),
            "spacing_mm": [float(s) for s in image.GetSpacing()],
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


class Predictor:
    """The models, loaded once (the segmenter only when a case first needs it), and one case's
    prediction: what ``bonemet predict`` runs for one CT or for each CT of a batch.

    The models come from callables (the registry's loaders, for ``bonemet predict``; objects at
    hand, in tests), so this module never touches MLflow. ``pseudonym`` maps a case id taken
    from a file name to the id the result carries (``data.pseudonymize``). The garbage collector
    is switched on only around the work that makes garbage (:meth:`run_gc`); the caller keeps it
    off while libraries and models load.

    Args:
        load_classifier: returns the :class:`Classifier` (with ``threshold`` unless ``threshold``
            is given).
        load_segmenter: returns the :class:`Segmenter`.
        radiomics_settings, mask_label, grid_tolerance_mm, min_lesion_ml: see :meth:`predict_case`.
        threshold: probability at or above which the label is 1; None: the classifier's own.
        alias: the registry alias the models were loaded by (reported in each result).
    """

    def __init__(self, *, load_classifier: Callable[[], Classifier], load_segmenter: Callable[[], Segmenter],
                 radiomics_settings: Mapping[str, Any], mask_label: int, grid_tolerance_mm: float,
                 min_lesion_ml: float, threshold: float | None, alias: str | None,
                 pseudonym: Callable[[str], str] = str) -> None:
        self._load_classifier, self._load_segmenter = load_classifier, load_segmenter
        self.radiomics_settings, self.mask_label = radiomics_settings, mask_label
        self.grid_tolerance_mm, self.min_lesion_ml = grid_tolerance_mm, float(min_lesion_ml)
        self.threshold, self.alias, self.pseudonym = threshold, alias, pseudonym
        self._classifier: Classifier | None = None
        self._segmenter: Segmenter | None = None

    @property
    def classifier(self) -> Classifier:
        if self._classifier is None:
            model = self._load_classifier()
            if self.threshold is None and getattr(model, "threshold", None) is None:
                name = getattr(model, "name", "the classifier")
                raise PredictError(f"{name}@{self.alias} carries no threshold (registered by an older bonemet: run "
                                   "the pipeline again) and --threshold was not given")
            self._classifier = model
        return self._classifier

    @property
    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            self._segmenter = self._load_segmenter()
        return self._segmenter

    @staticmethod
    def run_gc(work: Callable[[], Any]) -> Any:
        """Run ``work`` with the garbage collector on (segmentation and extraction make garbage)."""
        import gc

        enabled = gc.isenabled()
        gc.enable()
        try:
            return work()
        finally:
            if not enabled:
                gc.disable()

    def predict_case(self, image_path: str | Path | None, mask_path: str | Path | None = None, *,
                     save_mask: str | Path | None = None, case_id: str | None = None, roi: str | None = None,
                     seg_segment: Any = None) -> dict[str, Any]:
        """Probability that the bone metastasis in a CT comes from breast cancer.

        Args:
            image_path: CT in HU: NIfTI, NRRD, MetaImage file or a folder with one DICOM series;
                any spacing and orientation.
            mask_path: optional lesion mask on the CT's grid: a label map (lesion = ``mask_label``),
                a DICOM RTSTRUCT (``roi``) or SEG (``seg_segment``); without it the segmenter makes one.
            save_mask: where to write the lesion mask used: a label map (uint8 0/1, on the CT's
                grid; format by suffix) or, for a path ending in ``.dcm``, a DICOM SEG over the
                input series (the input must then be a DICOM series folder).
            case_id: the case's id (a batch's, already pseudonymised); None: from the file name,
                then pseudonymised.

        Returns:
            JSON-serialisable dict: ``case_id``, ``input``, ``status`` (``classified`` |
            ``no_lesion`` | ``lesion_too_small``), ``reason`` (None when classified),
            ``probability_breast`` and ``label`` (None unless classified), ``threshold``,
            ``in_domain`` and ``domain_reasons`` (see :func:`domain_fields`), ``lesion_volume_ml``
            (mL), ``lesion_voxels``, ``min_lesion_ml``, ``mask_source`` ("given" | "auto"),
            ``mask``, ``saved_mask``, ``n_features``, ``models`` (name and version of the
            classifier and of the segmenter when used), ``image`` (size, spacing in mm),
            ``seconds`` per step and ``alias``.

        Raises:
            bonemet.data.io.ImageReadError: a file is missing, unreadable or not an image.
            PredictError: no CT, mask off the CT's grid, an empty given mask, features not matching
                the classifier.
            ValueError: other failures of segmentation (CaseInferenceError) or extraction (BadMaskError).
        """
        if image_path is None:
            raise PredictError("no CT given: bonemet predict IMAGE [--mask MASK], or -i DIR_OR_MANIFEST -o OUT.csv")
        # Read (and check) the CT and mask before loading any model: a bad file fails in a second.
        inputs = load_inputs(image_path, mask_path, mask_label=self.mask_label, grid_tolerance_mm=self.grid_tolerance_mm,
                             case_id=case_id, roi=roi, seg_segment=seg_segment)
        if case_id is None:  # an id from the file name is pseudonymised like a manifest's (a batch's already are)
            inputs.case_id = self.pseudonym(inputs.case_id)
        check_save_mask(save_mask, inputs.image_path, inputs.case_id)
        start = time.perf_counter()
        classifier = self.classifier
        segmenter = self.segmenter if inputs.mask is None else None
        loading = time.perf_counter() - start
        threshold = self.threshold if self.threshold is not None else classifier.threshold
        log.info("predict: case '%s' from %s", inputs.case_id, image_path)
        result = self.run_gc(lambda: predict_inputs(
            inputs, segmenter=segmenter, classifier=classifier, radiomics_settings=self.radiomics_settings,
            threshold=float(threshold), grid_tolerance_mm=self.grid_tolerance_mm, min_lesion_ml=self.min_lesion_ml,
            save_mask=save_mask,
        ))
        if loading >= 0.001:
            result["seconds"]["load_models"] = round(loading, 3)
        result["alias"] = self.alias
        if result["probability_breast"] is None:
            log.info("predict: case '%s': %s", result["case_id"], result["reason"])
        else:
            log.info("predict: case '%s': P(breast) = %.3f -> label %d (mask %s, %.2f ml)", result["case_id"],
                     result["probability_breast"], result["label"], result["mask_source"], result["lesion_volume_ml"])
        return result
