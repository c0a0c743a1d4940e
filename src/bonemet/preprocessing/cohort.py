"""Preprocess a whole cohort into ``data/preprocessed/`` (one folder, written atomically)."""

from __future__ import annotations

import logging
from concurrent.futures import as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from bonemet.data.manifest import Case, read_manifest
from bonemet.preprocessing.pipeline import PreprocessError
from bonemet.utils import atomic_path, die_with_parent, progress, resolve_jobs, write_json

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import ComputeSpec, PlannedPreprocessSpec

log = logging.getLogger(__name__)

CASES_TABLE = "cases.csv"
CASES_COLUMNS = ("case_id", "label", "image", "mask", "geometry")


def read_manual_case(case: Case, *, mask_label: int, grid_tolerance_mm: float, single_thread: bool = False):
    """``(CT in HU, manual lesion mask on its grid)`` of ``case`` (label map, RTSTRUCT or SEG);
    ``single_thread``: ITK on one thread (one worker process per core already)."""
    import SimpleITK as sitk

    from bonemet.data.dicom_masks import read_lesion_mask
    from bonemet.data.io import read_image

    if single_thread:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    image = read_image(case.image, case_id=case.case_id)
    ref = case.mask_ref("manual")
    mask = read_lesion_mask(ref.path, image, label=mask_label, roi=ref.roi, seg_segment=ref.seg_segment,
                            case_id=case.case_id, grid_tolerance_mm=grid_tolerance_mm, reference_image_path=case.image)
    return image, mask


def _process_case(
    case: Case, out_dir: Path, mask_label: int, spec: PlannedPreprocessSpec, grid_tolerance_mm: float, single_thread: bool
) -> dict:
    """Preprocess one case and write its three files; returns its row of ``cases.csv``.

    A failure gets a note naming the case; a user's bad file is a
    :class:`~bonemet.errors.UserError` from the readers, anything else keeps its traceback.
    """
    from bonemet.data.io import write_image
    from bonemet.preprocessing.pipeline import preprocess_case

    try:
        image, mask = read_manual_case(case, mask_label=mask_label, grid_tolerance_mm=grid_tolerance_mm,
                                       single_thread=single_thread)
        result = preprocess_case(image, mask, spec, grid_tolerance_mm=grid_tolerance_mm, case_id=case.case_id)
        names = {
            "image": f"{case.case_id}_image.nii.gz",
            "mask": f"{case.case_id}_mask.nii.gz",
            "geometry": f"{case.case_id}_geometry.json",
        }
        write_image(result.image, out_dir / names["image"])
        write_image(result.mask, out_dir / names["mask"])
        write_json(out_dir / names["geometry"], result.geometry)
    except Exception as exc:
        exc.add_note(f"while preprocessing case '{case.case_id}' ({case.image})")
        raise
    return {"case_id": case.case_id, "label": case.label, **names}


def preprocess_cohort(
    cohort_dir: str | Path,
    spec: PlannedPreprocessSpec,
    *,
    compute: ComputeSpec,
    mask_label: int,
    grid_tolerance_mm: float,
    roi: str | None,
    seg_segment: int | str | None,
    pseudonym_key: bytes | None,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Preprocess every case of a cohort's manifest into ``spec.out_dir``.

    Writes ``<case_id>_image.nii.gz`` (float32 in [0, 1]), ``<case_id>_mask.nii.gz`` (uint8 0/1),
    ``<case_id>_geometry.json`` and ``cases.csv`` (columns case_id,label,image,mask,geometry;
    file names relative to the output folder). Everything is written into a temporary sibling
    folder that replaces the output folder only when every case succeeded. The cohort folder is
    only read.

    Args:
        cohort_dir: cohort in the bring-your-own format (``manifest.csv``).
        spec: the ``preprocess`` params (see :func:`bonemet.preprocessing.pipeline.preprocess_case`;
            mm, HU, voxels, ml), with ``out_dir`` (replaced as a whole) and ``n_jobs`` (worker
            processes, -1 all cores; 1 runs in this process).
        compute: the ``compute`` params: the cases run in a local pool of ``n_jobs`` processes or
            on a Dask cluster (:func:`bonemet.compute.case_executor`); same files either way.
        mask_label: lesion label value in the mask label maps (``data.mask_label``).
        grid_tolerance_mm: how far a mask's spacing/origin may differ from its CT's (mm).
        roi, seg_segment: the lesion's RTSTRUCT ROI / SEG segment for cases whose manifest leaves it
            empty (``data.roi``, ``data.segment``; None: such a case must give it).
        show_progress: show a progress bar on stderr.

    Returns:
        The ``cases.csv`` table, in manifest order.

    Raises:
        PreprocessError / ImageReadError: naming the first failing case; the output folder is
        then left as it was.
    """
    from bonemet.compute import case_executor, runs_in_process
    from bonemet.config import planned_spec

    spec = planned_spec(spec, "preprocess_cohort")  # the stages resolve `auto` from the plan, once
    if compute.scheduler == "dask":  # a cluster's workers have their own working folder: absolute paths
        cohort_dir = Path(cohort_dir).absolute()
    cases = read_manifest(cohort_dir, roi=roi, seg_segment=seg_segment, pseudonym_key=pseudonym_key)
    jobs = resolve_jobs(spec.n_jobs, len(cases))
    out_dir = Path(spec.out_dir)
    where = f"{jobs} process(es)" if compute.scheduler == "local" else f"Dask at {compute.dask_address}"
    log.info("preprocessing %d cases from %s with %s: %s", len(cases), cohort_dir, where,
             spec.model_dump(mode="json", exclude={"out_dir", "n_jobs"}))
    rows: dict[str, dict] = {}
    with atomic_path(out_dir, is_dir=True) as tmp:
        if runs_in_process(compute, jobs):
            for case in progress(cases, total=len(cases), desc="preprocess", disable=not show_progress):
                rows[case.case_id] = _process_case(case, tmp, int(mask_label), spec, grid_tolerance_mm, False)
        else:
            with case_executor(compute, workers=jobs, initializer=die_with_parent) as pool:
                futures = [
                    pool.submit(_process_case, case, tmp.absolute(), int(mask_label), spec, grid_tolerance_mm, True)
                    for case in cases
                ]
                for future in progress(
                    as_completed(futures), total=len(cases), desc="preprocess", disable=not show_progress
                ):
                    row = future.result()  # re-raises the worker's error, noted with the case
                    rows[row["case_id"]] = row
        table = pd.DataFrame([rows[c.case_id] for c in cases], columns=list(CASES_COLUMNS))
        table.to_csv(tmp / CASES_TABLE, index=False)
    log.info("wrote %d preprocessed cases to %s", len(table), out_dir)
    return table


def read_preprocessed(out_dir: str | Path) -> pd.DataFrame:
    """Read ``cases.csv`` of a preprocessed folder with absolute paths in image/mask/geometry."""
    out_dir = Path(out_dir)
    path = out_dir / CASES_TABLE
    if not path.is_file():
        raise PreprocessError(f"{path}: preprocessed cases table not found (run `bonemet preprocess`)")
    table = pd.read_csv(path, dtype={"case_id": str, "label": int})
    missing = [c for c in CASES_COLUMNS if c not in table.columns]
    if missing:
        raise PreprocessError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    for col in ("image", "mask", "geometry"):
        table[col] = [str(out_dir / name) for name in table[col]]
    return table
