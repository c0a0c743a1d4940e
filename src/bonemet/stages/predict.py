"""`bonemet predict`: probability of breast origin from a CT, as JSON on stdout; or many CTs to a CSV.

One CT: ``bonemet predict IMAGE [--mask MASK]`` prints the result as JSON. Many:
``bonemet predict -i DIR_OR_MANIFEST -o OUT.csv`` writes one row per case with the same fields
(:mod:`bonemet.serving.batch`) and prints a summary. Segments with ``bonemet-segmenter@ALIAS`` unless
a mask is given, extracts the PyRadiomics features with the training settings (``radiomics``
params over the settings file) and applies ``bonemet-classifier@ALIAS``; both models are loaded
once (the segmentation model only when a case needs it). Models come from the MLflow store
(``MLFLOW_TRACKING_URI`` or ``tracking.store_dir``; the local store is read without MLflow).

Every result has a ``status`` (:mod:`bonemet.serving.predict`): ``classified``, ``no_lesion``,
``lesion_too_small`` (no probability: ``probability_breast`` is null, ``reason`` says why) or, in a
batch, ``failed``. Exit code: 0 when every case got an answer (whatever its status), 1 when a
case failed (one CT: a user's mistake, printed as one line; a batch: a ``failed`` row, the others
done), 2 for a bad params file. A bug keeps its traceback (in a batch: logged, and the case's row
says failed).

Start-up is part of the answer time: the path with a given mask imports neither torch nor MLflow,
and the garbage collector is off while the libraries and models load (there is no garbage yet)
and frozen before exit, so the interpreter does not walk every object of scikit-learn and
pandas twice.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", nargs="?", default=None,
                        help="CT: NIfTI/NRRD/MHA file or a folder holding one DICOM series (HU)")
    parser.add_argument("-i", "--input", default=None, metavar="DIR_OR_MANIFEST",
                        help="many CTs: a folder of CTs (files or DICOM series folders; segmented) or a CSV "
                             "manifest (case_id,image[,mask,roi,segment]); needs -o")
    parser.add_argument("-o", "--out", dest="output", default=None, metavar="OUT.csv", help="with -i: the results, one row per case")
    parser.add_argument("--mask", default=None,
                        help="lesion mask on the CT: a label map (lesion = data.mask_label), a DICOM RTSTRUCT "
                             "(--roi) or SEG (--segment) (default: segment with MISSU)")
    parser.add_argument("--roi", default=None, help="the lesion's ROIName when --mask is an RTSTRUCT")
    parser.add_argument("--segment", default=None, help="the lesion's segment (number or label) when --mask is a SEG")
    parser.add_argument("--alias", default=None, help="model alias for both models (default: params register.alias)")
    parser.add_argument("--save-mask", default=None, metavar="PATH",
                        help="write the lesion mask used: PATH.nii.gz / .nrrd (uint8 0/1 on the CT's grid), or "
                             "PATH.dcm: a DICOM SEG over the input series (DICOM series input only)")
    parser.add_argument("--save-masks", default=None, metavar="DIR",
                        help="with -i: write each case's mask as DIR/<case_id>.nii.gz")
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability at or above which the label is 1 (default: the threshold registered "
                             "with the classifier, chosen on its training data)")
    parser.add_argument("--device", default=None,
                        help="torch device for segmentation: cpu, cuda (default: params segment.device; auto = CUDA "
                             "when available)")
    parser.add_argument("--disable-tta", action="store_true",
                        help="no test-time mirroring (the model's segment.inference.mirror_axes): 2^n times "
                             "faster segmentation, a little lower Dice (benchmarks/predict.md)")


def run(args: argparse.Namespace) -> int:
    import gc
    import json
    import sys

    from bonemet.errors import UserError
    from bonemet.registry.loaders import registered_predictor
    from bonemet.stages._common import pseudonym_key, specs_from

    gc.disable()  # start-up: imports and model loading make no garbage worth collecting
    try:
        params = specs_from(args)
        predictor = registered_predictor(params, alias=args.alias, threshold=args.threshold, device=args.device,
                                         mirror=not args.disable_tta, pseudonym_key=pseudonym_key(params))
        if args.input is not None or args.output is not None:
            if args.input is None or args.output is None:
                raise UserError("batch prediction needs both -i DIR_OR_MANIFEST and -o OUT.csv")
            if args.image is not None or args.mask is not None or args.save_mask is not None:
                raise UserError("give either one CT (IMAGE [--mask M] [--save-mask P]) or -i/-o, not both "
                                "(a manifest's mask column gives the masks of a batch, --save-masks DIR saves them)")
            from bonemet.serving.batch import predict_batch

            result = predict_batch(predictor, args.input, args.output, save_masks=args.save_masks,
                                   show_progress=not args.no_progress)
            code = 1 if result.pop("failed") else 0
        else:
            from bonemet.data.manifest import parse_segment

            result = predictor.predict_case(args.image, args.mask, save_mask=args.save_mask, roi=args.roi,
                                            segment=parse_segment(args.segment))
            code = 0
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n")
    finally:
        gc.enable()
    sys.stdout.flush()
    gc.freeze()  # the exit then skips walking every object of the libraries
    return code
