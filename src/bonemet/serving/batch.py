"""Many CTs at once (``bonemet predict -i DIR_OR_MANIFEST -o OUT.csv``, nnU-Net's habit).

Inputs:

* a **folder** of CTs: every NIfTI / NRRD / MetaImage file in it and every sub-folder (a DICOM
  series) is one case, named after the file or folder (:func:`case_id_from_path`), and segmented
  by the registered segmentation model. A folder holding a ``manifest.csv`` is read as a manifest.
* a **manifest** (a CSV file, or a cohort folder's ``manifest.csv``): the bring-your-own format's
  ``case_id`` and ``image`` columns, and optionally ``mask`` (a label map, RTSTRUCT or SEG; an
  empty cell: segment this case) with ``roi`` / ``segment``; paths relative to the manifest's
  folder. ``label`` and other columns may be present and are ignored, so a cohort's own manifest
  works as it is.

:func:`predict_many` runs one case after the other with the models loaded once, behind a progress
bar. A case that fails (an unreadable file, a mask off its CT's grid, a bug) gets a ``failed``
row with the reason and does not stop the others; a bug's traceback is logged. Every row has the
fields of the JSON result (:data:`RESULT_COLUMNS`, nested fields flattened with dots, lists as
JSON text), so a CSV from a run is one table whatever happened to each case.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonemet.data.io import IMAGE_SUFFIXES
from bonemet.data.manifest import MANIFEST_NAME
from bonemet.errors import UserError
from bonemet.serving.predict import FAILED, PredictError, case_id_from_path, failed_result

log = logging.getLogger(__name__)

#: the columns of a prediction manifest: required, then optional
MANIFEST_REQUIRED = ("case_id", "image")
MANIFEST_OPTIONAL = ("mask", "roi", "segment")

#: the CSV columns, in order: the JSON result's fields (nested ones flattened with dots)
RESULT_COLUMNS = (
    "case_id", "input", "status", "reason", "probability_breast", "label", "threshold", "in_domain",
    "domain_reasons", "lesion_volume_ml", "lesion_voxels", "min_lesion_ml", "mask_source", "mask", "saved_mask",
    "n_features", "models.classifier.name", "models.classifier.version", "models.segmenter.name",
    "models.segmenter.version", "image.size", "image.spacing_mm", "alias",
)
#: the ``seconds`` steps, in this order in the CSV (``seconds.<step>``); others follow sorted
SECONDS_ORDER = ("read", "segment", "segment_preprocess", "segment_windows", "segment_map_back", "features",
                 "classify")


class BatchInputError(UserError, ValueError):
    """The batch input (folder or manifest) cannot be read, or holds no case."""


@dataclass(frozen=True)
class BatchCase:
    """One CT of a batch: its id, image, and optional mask (with its RTSTRUCT ROI / SEG segment)."""

    case_id: str
    image: Path
    mask: Path | None = None
    roi: str | None = None
    seg_segment: int | str | None = None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def read_batch_input(path: str | Path) -> list[BatchCase]:
    """The cases of a folder of CTs or of a manifest (see the module docstring).

    Raises:
        BatchInputError: the path does not exist, the manifest lacks a column or repeats a
            case id, or no case is found.
    """
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        path = path / MANIFEST_NAME
    if path.is_file():
        return read_prediction_manifest(path)
    if not path.is_dir():
        raise BatchInputError(f"{path}: no such folder or manifest (expected a folder of CTs or a CSV manifest)")
    cases, skipped = [], []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() or _is_image(entry):
            cases.append(BatchCase(case_id_from_path(entry), entry))
        else:
            skipped.append(entry.name)
    if skipped:
        log.warning("%s: %d file(s) that are not CTs skipped: %s", path, len(skipped), ", ".join(skipped[:5]))
    if not cases:
        raise BatchInputError(f"{path}: no CT found (expected NIfTI/NRRD/MetaImage files or DICOM series folders)")
    _check_unique([c.case_id for c in cases], str(path))
    return cases


def _check_unique(case_ids: Sequence[str], where: str) -> None:
    seen: dict[str, int] = {}
    for case_id in case_ids:
        seen[case_id] = seen.get(case_id, 0) + 1
    repeated = sorted(c for c, n in seen.items() if n > 1)
    if repeated:
        raise BatchInputError(f"{where}: case id(s) {', '.join(repeated[:5])} appear more than once "
                              "(each case's row in the output is named by its id)")


def read_prediction_manifest(path: str | Path) -> list[BatchCase]:
    """The cases of a prediction manifest (CSV): ``case_id``, ``image`` and optional ``mask``,
    ``roi``, ``segment``; paths relative to the manifest's folder."""
    import pandas as pd

    from bonemet.data.manifest import parse_segment

    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, OSError) as exc:
        raise BatchInputError(f"{path}: not a readable CSV manifest ({exc})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in MANIFEST_REQUIRED if c not in table.columns]
    if missing:
        raise BatchInputError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)} "
                              f"(a prediction manifest has {', '.join(MANIFEST_REQUIRED)}, optionally "
                              f"{', '.join(MANIFEST_OPTIONAL)})")
    cases = []
    for row_no, row in enumerate(table.to_dict("records"), start=2):
        row = {k: str(v).strip() for k, v in row.items()}
        if not row["case_id"] or not row["image"]:
            raise BatchInputError(f"{path}: row {row_no}: empty case_id or image")
        mask = row.get("mask") or None
        cases.append(BatchCase(row["case_id"], path.parent / row["image"], path.parent / mask if mask else None,
                               row.get("roi") or None, parse_segment(row.get("segment"))))
    if not cases:
        raise BatchInputError(f"{path}: the manifest has no cases")
    _check_unique([c.case_id for c in cases], str(path))
    return cases


def predict_many(cases: Sequence[BatchCase], predict_one: Callable[[BatchCase], dict[str, Any]], *,
                 show_progress: bool) -> list[dict[str, Any]]:
    """``predict_one`` over ``cases`` in order, one result each; a failing case gets
    :func:`failed_result` (a :class:`~bonemet.errors.UserError`'s message, or a bug's type and
    message with its traceback logged) and the others go on."""
    from bonemet.utils import progress

    results = []
    for case in progress(cases, total=len(cases), desc="predict", disable=not show_progress):
        try:
            results.append(predict_one(case))
        except UserError as exc:
            log.error("case '%s' failed: %s", case.case_id, exc)
            results.append(failed_result(case.case_id, case.image, str(exc)))
        except Exception as exc:  # a bug: keep its traceback in the log, report it, go on
            log.exception("case '%s' failed with an unexpected error", case.case_id)
            results.append(failed_result(case.case_id, case.image, f"{type(exc).__name__}: {exc}"))
    return results


def is_batch(image: str | None, mask: str | None, save_mask: str | None, input_path: str | None,
             output_path: str | None) -> bool:
    """Whether ``bonemet predict``'s arguments ask for a batch (``-i``/``-o``) or one CT.

    Raises:
        PredictError: only one of ``-i``/``-o``, or a batch's arguments mixed with one CT's.
    """
    if input_path is None and output_path is None:
        return False
    if input_path is None or output_path is None:
        raise PredictError("batch prediction needs both -i DIR_OR_MANIFEST and -o OUT.csv")
    if image is not None or mask is not None or save_mask is not None:
        raise PredictError("give either one CT (IMAGE [--mask M] [--save-mask P]) or -i/-o, not both "
                           "(a manifest's mask column gives the masks of a batch, --save-masks DIR saves them)")
    return True


def predict_batch(predictor: Any, input_path: str | Path, output_path: str | Path, *,
                  save_masks: str | Path | None, show_progress: bool) -> dict[str, Any]:
    """Every case of a folder or manifest through ``predictor``
    (:class:`~bonemet.serving.predict.Predictor`), the results written to ``output_path`` (CSV).

    Case ids are pseudonymised by the predictor's ``pseudonym``; a case without a mask is
    segmented; ``save_masks``: a folder for each case's mask (``<case_id>.nii.gz``). The models
    are loaded first, so a missing or broken model fails the batch, not every case in turn.

    Returns:
        the summary: ``input``, ``output``, ``cases``, ``statuses`` (count per status), ``alias``,
        ``failed`` (True when a case failed: its row in the CSV holds the error; the CLI exits non-zero).
    """
    from dataclasses import replace

    cases = [replace(c, case_id=predictor.pseudonym(c.case_id)) for c in read_batch_input(input_path)]
    save_dir = Path(save_masks) if save_masks else None
    predictor.classifier  # noqa: B018
    if any(case.mask is None for case in cases):
        predictor.segmenter  # noqa: B018

    def one(case: BatchCase) -> dict[str, Any]:
        save = save_dir / f"{case.case_id}.nii.gz" if save_dir is not None else None
        return predictor.predict_case(case.image, case.mask, save_mask=save, case_id=case.case_id, roi=case.roi,
                                      seg_segment=case.seg_segment)

    results = predictor.run_gc(lambda: predict_many(cases, one, show_progress=show_progress))
    write_results_csv(results, output_path)
    counts = summary(results)
    log.info("predict: %d case(s) from %s -> %s: %s", len(results), input_path, output_path,
             ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return {"input": str(input_path), "output": str(output_path), "cases": len(results), "statuses": counts,
            "alias": predictor.alias, "failed": any_failed(results)}


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return value


def flatten_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row of a result: ``models``, ``image`` and ``seconds`` flattened with dots."""
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if key == "models":
            for role in ("classifier", "segmenter"):
                ref = (value or {}).get(role) or {}
                flat[f"models.{role}.name"] = ref.get("name")
                flat[f"models.{role}.version"] = ref.get("version")
        elif key in ("image", "seconds"):
            for inner, item in (value or {}).items():
                flat[f"{key}.{inner}"] = item
        else:
            flat[key] = value
    return flat


def result_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """:data:`RESULT_COLUMNS`, then the ``seconds.*`` columns of ``rows`` (known steps first)."""
    steps = {key.removeprefix("seconds.") for row in rows for key in row if key.startswith("seconds.")}
    ordered = [s for s in SECONDS_ORDER if s in steps] + sorted(steps - set(SECONDS_ORDER))
    return [*RESULT_COLUMNS, *(f"seconds.{s}" for s in ordered)]


def write_results_csv(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one row per result (:func:`flatten_result`) to ``path``, atomically."""
    import csv

    from bonemet.utils import atomic_path

    rows = [flatten_result(r) for r in results]
    columns = result_columns(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})
    return path


def summary(results: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many cases ended in each status."""
    counts: dict[str, int] = {}
    for result in results:
        counts[str(result["status"])] = counts.get(str(result["status"]), 0) + 1
    return counts


def any_failed(results: Sequence[Mapping[str, Any]]) -> bool:
    return any(r["status"] == FAILED for r in results)
