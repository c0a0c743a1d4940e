"""`bonemet predict`: probability of breast origin from a CT, as JSON on stdout; or many CTs to a CSV.

One CT: ``bonemet predict IMAGE [--mask MASK]`` prints the result as JSON. Many:
``bonemet predict -i DIR_OR_MANIFEST -o OUT.csv`` writes one row per case with the same fields
(:mod:`bonemet.serving.batch`) and prints a summary. Segments with ``bonemet-missu@ALIAS`` unless
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
from pathlib import Path
from typing import Any

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

    from bonemet.stages._common import specs_from

    gc.disable()  # start-up: imports and model loading make no garbage worth collecting
    try:
        params = specs_from(args)
        args.alias = args.alias or params.registration.alias
        predictor = _Predictor(args, params)
        if args.input is not None or args.output is not None:
            code = _run_batch(args, predictor)
        else:
            from bonemet.data.manifest import parse_segment

            result = predictor.predict_one(args.image, args.mask, save_mask=args.save_mask, roi=args.roi,
                                           segment=parse_segment(args.segment))
            sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n")
            code = 0
    finally:
        gc.enable()
    sys.stdout.flush()
    gc.freeze()  # the exit then skips walking every object of the libraries
    return code


def _run_batch(args: argparse.Namespace, predictor: _Predictor) -> int:
    import json
    import sys

    from bonemet.errors import UserError
    from bonemet.serving.batch import any_failed, predict_many, read_batch_input, summary, write_results_csv

    if args.input is None or args.output is None:
        raise UserError("batch prediction needs both -i DIR_OR_MANIFEST and -o OUT.csv")
    if args.image is not None or args.mask is not None or args.save_mask is not None:
        raise UserError("give either one CT (IMAGE [--mask M] [--save-mask P]) or -i/-o, not both "
                        "(a manifest's mask column gives the masks of a batch, --save-masks DIR saves them)")
    from dataclasses import replace

    cases = [replace(c, case_id=predictor.pseudonym(c.case_id)) for c in read_batch_input(args.input)]
    save_dir = Path(args.save_masks) if args.save_masks else None
    # the models first: a missing or broken model fails the command, not every case in turn
    predictor.classifier  # noqa: B018
    if any(case.mask is None for case in cases):
        predictor.segmenter  # noqa: B018

    def one(case):
        save = save_dir / f"{case.case_id}.nii.gz" if save_dir is not None else None
        return predictor.predict_one(case.image, case.mask, save_mask=save, case_id=case.case_id, roi=case.roi,
                                     segment=case.segment)

    results = predictor.run_gc(lambda: predict_many(cases, one, show_progress=not args.no_progress))
    write_results_csv(results, args.output)
    counts = summary(results)
    log.info("predict: %d case(s) from %s -> %s: %s", len(results), args.input, args.output,
             ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    sys.stdout.write(json.dumps({"input": str(args.input), "output": str(args.output), "cases": len(results),
                                 "statuses": counts, "alias": args.alias}, indent=2, sort_keys=True) + "\n")
    return 1 if any_failed(results) else 0


class _Predictor:
    """The models, loaded once (the segmenter when a case first needs it), and one case's prediction."""

    def __init__(self, args: argparse.Namespace, params: Any) -> None:
        import os

        from bonemet.radiomics import settings_from_params
        from bonemet.registry.local import default_tracking_uri
        from bonemet.stages._common import pseudonym_key

        self.args, self.params = args, params
        self.tolerance = params.validation.grid_tolerance_mm
        self.min_lesion_ml = float(params.validation.lesion_volume_ml[0])
        self.settings = settings_from_params(params)
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(params.tracking.store_dir)
        self.key = pseudonym_key(params)
        self._classifier = None
        self._segmenter = None

    def pseudonym(self, case_id: str) -> str:
        """``case_id``, or its pseudonym when ``data.pseudonymize`` is on."""
        if self.key is None:
            return case_id
        from bonemet.data.pseudonym import pseudonym

        return pseudonym(case_id, self.key)

    def run_gc(self, work):
        """Run ``work`` with the garbage collector on (segmentation makes garbage)."""
        import gc

        gc.enable()
        try:
            return work()
        finally:
            gc.disable()

    @property
    def classifier(self) -> Any:
        if self._classifier is None:
            from bonemet.registry.loaders import ModelNotFoundError, load_classifier

            reg = self.params.registration
            model = load_classifier(reg.model_name, self.args.alias, tracking_uri=self.tracking_uri,
                                    store_dir=self.params.tracking.store_dir)
            if self.args.threshold is None and getattr(model, "threshold", None) is None:
                raise ModelNotFoundError(f"{reg.model_name}@{self.args.alias} carries no threshold (registered by an "
                                         "older bonemet: run the pipeline again) and --threshold was not given")
            self._classifier = model
        return self._classifier

    @property
    def segmenter(self) -> Any:
        if self._segmenter is None:
            from bonemet.registry.loaders import load_segmenter
            from bonemet.segmentation.training import resolve_device
            from bonemet.serving.predict import MissuSegmenter

            name = self.params.segment.model_name  # the name the segment stage registered it under
            device = self.args.device or str(resolve_device(self.params.segment.device))
            network, metadata, version = load_segmenter(name, self.args.alias, device=device,
                                                        tracking_uri=self.tracking_uri,
                                                        store_dir=self.params.tracking.store_dir)
            segmenter = MissuSegmenter.from_metadata(network, metadata, device=device, name=name,
                                                     version=version)
            if self.args.disable_tta:
                segmenter.settings = segmenter.settings.without_mirroring()
            self._segmenter = segmenter
        return self._segmenter

    def predict_one(self, image: str | Path | None, mask: str | Path | None, *, save_mask: str | Path | None,
                    case_id: str | None = None, roi: str | None = None, segment: Any = None) -> dict[str, Any]:
        import time

        from bonemet.errors import UserError
        from bonemet.serving.predict import check_save_mask, load_inputs, predict_inputs

        if image is None:
            raise UserError("no CT given: bonemet predict IMAGE [--mask MASK], or -i DIR_OR_MANIFEST -o OUT.csv")
        # Read (and check) the CT and mask before loading any model: a bad file fails in a second.
        inputs = load_inputs(image, mask, mask_label=self.params.data.mask_label, grid_tolerance_mm=self.tolerance,
                             case_id=case_id, roi=roi, segment=segment)
        if case_id is None:  # an id from the file name is pseudonymised like a manifest's (a batch's already are)
            inputs.case_id = self.pseudonym(inputs.case_id)
        check_save_mask(save_mask, inputs.image_path, inputs.case_id)
        start = time.perf_counter()
        classifier = self.classifier
        segmenter = self.segmenter if inputs.mask is None else None
        loading = time.perf_counter() - start
        threshold = self.args.threshold if self.args.threshold is not None else classifier.threshold
        log.info("predict: case '%s' from %s", inputs.case_id, image)
        result = self.run_gc(lambda: predict_inputs(
            inputs, segmenter=segmenter, classifier=classifier, radiomics_settings=self.settings,
            threshold=float(threshold), grid_tolerance_mm=self.tolerance, min_lesion_ml=self.min_lesion_ml,
            save_mask=save_mask,
        ))
        if loading >= 0.001:
            result["seconds"]["load_models"] = round(loading, 3)
        result["alias"] = self.args.alias
        if result["probability_breast"] is None:
            log.info("predict: case '%s': %s", result["case_id"], result["reason"])
        else:
            log.info("predict: case '%s': P(breast) = %.3f -> label %d (mask %s, %.2f ml)", result["case_id"],
                     result["probability_breast"], result["label"], result["mask_source"], result["lesion_volume_ml"])
        return result
