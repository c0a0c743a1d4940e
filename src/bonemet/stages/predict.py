"""`bonemet predict IMAGE`: probability of breast origin from a CT, as JSON on stdout.

Segments with ``bonemet-missu@ALIAS`` unless ``--mask`` is given, extracts the PyRadiomics
features with the training settings (``radiomics`` params over the settings file) and applies
``bonemet-classifier@ALIAS``. Models come from the MLflow store (``MLFLOW_TRACKING_URI`` or
``register.store_dir``). Any failure is logged as one line and exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="CT: NIfTI/NRRD/MHA file or a folder holding one DICOM series (HU)")
    parser.add_argument("--mask", default=None, help="lesion label map on the CT's grid (default: segment with MISSU)")
    parser.add_argument("--alias", default="staging", help="model alias for both models (default staging)")
    parser.add_argument("--save-mask", default=None, metavar="PATH",
                        help="write the lesion mask used (uint8 0/1 on the CT's grid), e.g. lesion.nii.gz")
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability at or above which the label is 1 (default: the classifier's registered "
                             "threshold, else params register.threshold)")
    parser.add_argument("--device", default="cpu", help="torch device for segmentation (default cpu)")


def segmentation_fallback(params: dict[str, Any], profile: str | None = None) -> dict[str, Any]:
    """Inference settings from params (``segment`` with its profile merged, ``preprocess``).

    Used only for keys the registered segmentation model lacks in its metadata.
    """
    from bonemet.config import get
    from bonemet.stages.segment import resolve_params

    seg = resolve_params(params, profile) if params.get("segment") else {}
    pre = params.get("preprocess") or {}
    crop = pre.get("crop") or {}
    preprocess = None
    if pre:
        preprocess = {
            "target_spacing_mm": list(pre["target_spacing_mm"]), "image_interpolator": pre["image_interpolator"],
            "hu_window": list(pre["hu_window"]), "bone_threshold_hu": crop.get("bone_threshold_hu"),
            "margin_mm": crop.get("margin_mm"), "min_size_vox": list(crop.get("min_size_vox", [])),
            "min_component_ml": crop.get("min_component_ml"),
        }
        preprocess = {k: v for k, v in preprocess.items() if v is not None and v != []}
    return {
        "preprocess": preprocess,
        "roi_size": get(seg, "roi_size", None),
        "overlap": get(seg, "inference.overlap", None),
        "sw_batch_size": get(seg, "inference.sw_batch_size", None),
        "mirror_axes": get(seg, "inference.mirror_axes", None),
        "threshold": get(seg, "threshold", None),
        "largest_component": get(seg, "largest_component", None),
    }


def run(args: argparse.Namespace) -> int:
    from bonemet.config import ParamsError

    try:
        result = _predict(args)
    except ParamsError:
        raise  # the command line answers a params problem with exit code 2
    except ValueError as exc:  # ImageReadError, PredictError, ModelNotFoundError, BadMaskError, ...
        log.error("predict: %s", exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - a command-line user gets one line, never a traceback
        log.debug("predict failed", exc_info=True)
        log.error("predict: %s: %s", type(exc).__name__, exc)
        return 1
    import json
    import sys

    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return 0


def _predict(args: argparse.Namespace) -> dict[str, Any]:
    import os

    from bonemet.config import get, section
    from bonemet.serving.predict import MissuSegmenter, load_inputs, predict_inputs
    from bonemet.stages._common import params_from, radiomics_settings

    params = params_from(args)
    reg = section(params, "register")
    mask_label = int(get(params, "data.mask_label", get(params, "radiomics.label", 1)))
    settings = radiomics_settings(params)
    # Read (and check) the CT and mask before loading any model: a bad file fails in a second.
    inputs = load_inputs(args.image, args.mask, mask_label=mask_label,
                         grid_tolerance_mm=float(get(params, "validate.grid_tolerance_mm", 1e-3)))

    from bonemet.tracking.loaders import load_classifier, load_segmenter
    from bonemet.tracking.mlflow_backend import configure as configure_mlflow

    uri = configure_mlflow(os.environ.get("MLFLOW_TRACKING_URI"), reg.get("store_dir", "mlruns"))
    log.info("predict: case '%s' from %s; models from %s", inputs.case_id, args.image, uri)
    classifier = load_classifier(reg["model_name"], args.alias)
    segmenter = None
    if inputs.mask is None:
        seg_name = reg.get("segmentation_model_name", "bonemet-missu")
        network, metadata, version = load_segmenter(seg_name, args.alias, device=args.device)
        segmenter = MissuSegmenter.from_metadata(
            network, metadata, fallback=segmentation_fallback(params), device=args.device, name=seg_name,
            version=version,
        )
    threshold = args.threshold
    if threshold is None:
        threshold = classifier.threshold if classifier.threshold is not None else float(reg["threshold"])
    result = predict_inputs(
        inputs, segmenter=segmenter, classifier=classifier, radiomics_settings=settings,
        threshold=float(threshold), save_mask=args.save_mask,
    )
    result["alias"] = args.alias
    log.info("predict: case '%s': P(breast) = %.3f -> label %d (mask %s, %.2f ml)", result["case_id"],
             result["probability_breast"], result["label"], result["mask_source"], result["lesion_volume_ml"])
    return result
