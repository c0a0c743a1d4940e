"""`bonemet predict`: probability of breast origin from a CT, as JSON on stdout; or many CTs to a CSV.

One CT: ``bonemet predict IMAGE [--mask MASK]`` prints the result as JSON; many: ``-i
DIR_OR_MANIFEST -o OUT.csv``, one row per case (:mod:`bonemet.serving.batch`). Without a mask the
case is segmented by ``bonemet-segmenter@ALIAS``; the classifier is ``bonemet-classifier@ALIAS``
(:class:`bonemet.serving.predict.Predictor`, which says what a result holds). Exit code: 0 when
every case got an answer (whatever its ``status``), 1 when a case failed, 2 for a bad params file.
The garbage collector is off while libraries and models load and frozen before exit: start-up is
part of the answer time.
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

    from bonemet.registry.loaders import registered_predictor
    from bonemet.serving.batch import is_batch, predict_batch
    from bonemet.stages._common import pseudonym_key, specs_from

    gc.disable()  # start-up: imports and model loading make no garbage worth collecting
    try:
        params = specs_from(args)
        predictor = registered_predictor(params, alias=args.alias, threshold=args.threshold, device=args.device,
                                         mirror=not args.disable_tta, pseudonym_key=pseudonym_key(params))
        if is_batch(args.image, args.mask, args.save_mask, args.input, args.output):
            result = predict_batch(predictor, args.input, args.output, save_masks=args.save_masks,
                                   show_progress=not args.no_progress)
            code = 1 if result.pop("failed") else 0
        else:
            from bonemet.data.manifest import parse_segment

            result = predictor.predict_case(args.image, args.mask, save_mask=args.save_mask, roi=args.roi,
                                            seg_segment=parse_segment(args.segment))
            code = 0
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n")
    finally:
        gc.enable()
    sys.stdout.flush()
    gc.freeze()  # the exit then skips walking every object of the libraries
    return code
