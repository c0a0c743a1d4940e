"""Preprocess a whole cohort into ``data/preprocessed/`` (one folder, written atomically)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd

from bonemet.data.manifest import Case, read_manifest
from bonemet.utils import atomic_path, progress, write_json

log = logging.getLogger(__name__)

CASES_TABLE = "cases.csv"
CASES_COLUMNS = ("case_id", "label", "image", "mask", "geometry")


def _resolve_jobs(n_jobs: int, n_cases: int) -> int:
    if n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"n_jobs must be a positive number of processes or -1 (all cores), found {n_jobs}")
    cores = os.cpu_count() or 1
    return max(1, min(n_cases, cores if n_jobs == -1 else n_jobs))


def _process_case(
    case: Case, out_dir: Path, mask_label: int, options: dict[str, Any], single_thread: bool
) -> dict:
    """Preprocess one case and write its three files; returns its row of ``cases.csv``."""
    import SimpleITK as sitk

    from bonemet.data.io import read_image, read_mask, write_image
    from bonemet.preprocessing.pipeline import PreprocessError, preprocess_case

    if single_thread:  # one process per core already: avoid oversubscribing ITK threads
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        image = read_image(case.image, case_id=case.case_id)
        mask = read_mask(case.manual_mask, label=mask_label, case_id=case.case_id)
        result = preprocess_case(image, mask, case_id=case.case_id, **options)
        names = {
            "image": f"{case.case_id}_image.nii.gz",
            "mask": f"{case.case_id}_mask.nii.gz",
            "geometry": f"{case.case_id}_geometry.json",
        }
        write_image(result.image, out_dir / names["image"])
        write_image(result.mask, out_dir / names["mask"])
        write_json(out_dir / names["geometry"], result.geometry)
    except PreprocessError:
        raise
    except Exception as exc:  # name the case whatever went wrong
        raise PreprocessError(f"case '{case.case_id}' ({case.image}): preprocessing failed: {exc}") from exc
    return {"case_id": case.case_id, "label": case.label, **names}


def preprocess_cohort(
    cohort_dir: str | Path,
    out_dir: str | Path,
    *,
    mask_label: int,
    target_spacing_mm: Sequence[float],
    image_interpolator: str,
    hu_window: Sequence[float],
    bone_threshold_hu: float,
    margin_mm: float,
    min_size_vox: Sequence[int],
    min_component_ml: float = 1.0,
    mask_interpolator: str = "nearest",
    n_jobs: int = 1,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Preprocess every case of a cohort's manifest into ``out_dir``.

    Writes ``<case_id>_image.nii.gz`` (float32 in [0, 1]), ``<case_id>_mask.nii.gz`` (uint8 0/1),
    ``<case_id>_geometry.json`` and ``cases.csv`` (columns case_id,label,image,mask,geometry;
    file names relative to ``out_dir``). Everything is written into a temporary sibling folder
    that replaces ``out_dir`` only when every case succeeded. The cohort folder is only read.

    Args:
        cohort_dir: cohort in the bring-your-own format (``manifest.csv``).
        out_dir: output folder (replaced as a whole).
        mask_label: lesion label value in the mask label maps.
        target_spacing_mm, image_interpolator, hu_window, bone_threshold_hu, margin_mm,
        min_size_vox, min_component_ml, mask_interpolator: see
            :func:`bonemet.preprocessing.pipeline.preprocess_case` (mm, HU, voxels, ml).
        n_jobs: worker processes (-1: all cores); 1 runs in this process.
        show_progress: show a progress bar on stderr.

    Returns:
        The ``cases.csv`` table, in manifest order.

    Raises:
        PreprocessError: naming the first failing case; ``out_dir`` is then left as it was.
    """
    cases = read_manifest(cohort_dir)
    options = {
        "target_spacing_mm": [float(v) for v in target_spacing_mm],
        "image_interpolator": image_interpolator,
        "hu_window": [float(v) for v in hu_window],
        "bone_threshold_hu": float(bone_threshold_hu),
        "margin_mm": float(margin_mm),
        "min_size_vox": [int(v) for v in min_size_vox],
        "min_component_ml": float(min_component_ml),
        "mask_interpolator": mask_interpolator,
    }
    jobs = _resolve_jobs(n_jobs, len(cases))
    log.info("preprocessing %d cases from %s with %d process(es): %s", len(cases), cohort_dir, jobs, options)
    rows: dict[str, dict] = {}
    with atomic_path(out_dir, is_dir=True) as tmp:
        if jobs == 1:
            for case in progress(cases, total=len(cases), desc="preprocess", disable=not show_progress):
                rows[case.case_id] = _process_case(case, tmp, int(mask_label), options, False)
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = [
                    pool.submit(_process_case, case, tmp, int(mask_label), options, True) for case in cases
                ]
                try:
                    for future in progress(
                        as_completed(futures), total=len(cases), desc="preprocess", disable=not show_progress
                    ):
                        row = future.result()  # re-raises the worker's PreprocessError naming the case
                        rows[row["case_id"]] = row
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        table = pd.DataFrame([rows[c.case_id] for c in cases], columns=list(CASES_COLUMNS))
        table.to_csv(tmp / CASES_TABLE, index=False)
    log.info("wrote %d preprocessed cases to %s", len(table), out_dir)
    return table


def read_preprocessed(out_dir: str | Path) -> pd.DataFrame:
    """Read ``cases.csv`` of a preprocessed folder with absolute paths in image/mask/geometry."""
    out_dir = Path(out_dir)
    path = out_dir / CASES_TABLE
    if not path.is_file():
        raise ValueError(f"{path}: preprocessed cases table not found (run `bonemet preprocess`)")
    table = pd.read_csv(path, dtype={"case_id": str, "label": int})
    missing = [c for c in CASES_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    for col in ("image", "mask", "geometry"):
        table[col] = [str(out_dir / name) for name in table[col]]
    return table
