"""`bonemet predict IMAGE`: probability of breast origin from a CT, as JSON on stdout.

Segments with ``bonemet-missu@ALIAS`` unless ``--mask`` is given, extracts the PyRadiomics
features with the training settings (``radiomics`` params over the settings file) and applies
``bonemet-classifier@ALIAS``. Models come from the MLflow store (``MLFLOW_TRACKING_URI`` or
``tracking.store_dir``). A user's mistake (a bad file, no such model) is one line and exit 1;
a bug keeps its traceback.
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
                        help="probability at or above which the label is 1 (default: the threshold registered "
                             "with the classifier, chosen on its training data)")
    parser.add_argument("--device", default="cpu", help="torch device for segmentation (default cpu)")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    result = _predict(args)
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return 0


def _predict(args: argparse.Namespace) -> dict[str, Any]:
    from bonemet.radiomics import settings_from_params
    from bonemet.serving.predict import MissuSegmenter, load_inputs, predict_inputs
    from bonemet.stages._common import open_store, pseudonym_key, specs_from

    params = specs_from(args)
    reg = params.registration
    tolerance = params.validation.grid_tolerance_mm
    settings = settings_from_params(params)
    # Read (and check) the CT and mask before loading any model: a bad file fails in a second.
    inputs = load_inputs(args.image, args.mask, mask_label=params.data.mask_label, grid_tolerance_mm=tolerance)
    key = pseudonym_key(params)
    if key is not None:  # the id from the file name is pseudonymised like the manifest's
        from bonemet.data.pseudonym import pseudonym

        inputs.case_id = pseudonym(inputs.case_id, key)

    from bonemet.registry.loaders import load_classifier, load_segmenter

    uri = open_store(params)
    log.info("predict: case '%s' from %s; models from %s", inputs.case_id, args.image, uri)
    classifier = load_classifier(reg.model_name, args.alias)
    segmenter = None
    if inputs.mask is None:
        network, metadata, version = load_segmenter(reg.segmentation_model_name, args.alias, device=args.device)
        segmenter = MissuSegmenter.from_metadata(network, metadata, device=args.device,
                                                 name=reg.segmentation_model_name, version=version)
    threshold = args.threshold if args.threshold is not None else classifier.threshold
    if threshold is None:
        from bonemet.registry.loaders import ModelNotFoundError

        raise ModelNotFoundError(f"{reg.model_name}@{args.alias} carries no threshold (registered by an older "
                                 "bonemet: run the pipeline again) and --threshold was not given")
    result = predict_inputs(
        inputs, segmenter=segmenter, classifier=classifier, radiomics_settings=settings,
        threshold=float(threshold), grid_tolerance_mm=tolerance, save_mask=args.save_mask,
    )
    result["alias"] = args.alias
    log.info("predict: case '%s': P(breast) = %.3f -> label %d (mask %s, %.2f ml)", result["case_id"],
             result["probability_breast"], result["label"], result["mask_source"], result["lesion_volume_ml"])
    return result
