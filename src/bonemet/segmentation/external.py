"""Automatic masks made elsewhere (``segment.model: external``): nnU-Net, TotalSegmentator, ...

Many groups already have a segmentation model. Its masks replace MISSU's out-of-fold masks:
one label map ``<case_id>.nii.gz`` per case (nnU-Net's naming of its predictions) in one folder.
Nothing is trained and nothing is registered. Each mask is

* checked: the file exists, is a readable integer label map, and holds voxels of the lesion
  value (``segment.external.label``); a missing or empty case stops the stage naming the case
  and the file;
* put on its CT's grid: a mask within ``validate.grid_tolerance_mm`` of the grid takes the CT's
  geometry exactly; a mask on another grid (resampled or cropped by the other tool) is mapped
  onto it by nearest neighbour in physical space, and must keep lesion voxels inside the CT;
* written like the segment stage's own masks: uint8, lesion = ``data.mask_label``, on the
  original CT grid, so the extract stage and everything after it run unchanged;
* scored against the manual mask (Dice, HD95, volume difference), as MISSU's masks are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from bonemet.data.dicom_masks import read_lesion_mask
from bonemet.data.io import read_image, read_mask, resample_to_reference, same_grid, write_image
from bonemet.data.manifest import Case
from bonemet.errors import UserError
from bonemet.segmentation.metrics import case_metrics
from bonemet.utils import atomic_path, progress

log = logging.getLogger(__name__)

#: nnU-Net's file name of a case's prediction
EXTERNAL_SUFFIX = ".nii.gz"


class ExternalMaskError(UserError, ValueError):
    """An external automatic mask is missing, unreadable, empty or outside its CT."""


def external_mask_path(masks_dir: str | Path, case_id: str) -> Path:
    """Where the external mask of ``case_id`` must be: ``<masks_dir>/<case_id>.nii.gz``."""
    return Path(masks_dir) / f"{case_id}{EXTERNAL_SUFFIX}"


def resolve_external_dir(masks_dir: str | Path, cohort_dir: str | Path) -> Path:
    """``segment.external.masks_dir`` resolved: relative paths are inside the cohort folder."""
    masks_dir = Path(masks_dir)
    return masks_dir if masks_dir.is_absolute() else Path(cohort_dir) / masks_dir


def load_external_mask(path: Path, image: sitk.Image, *, label: int, case_id: str,
                       grid_tolerance_mm: float) -> sitk.Image:
    """The external mask of one case as a 0/1 mask on ``image``'s grid.

    Raises:
        ExternalMaskError: missing file, no voxel == ``label``, or no lesion voxel inside the CT.
        bonemet.data.io.ImageReadError: unreadable or non-integer label map.
    """
    fix = (f"segment.model external expects one {EXTERNAL_SUFFIX} label map per case, named by its case_id "
           "(nnU-Net's naming), with the lesion = segment.external.label")
    if not path.is_file():
        raise ExternalMaskError(f"case '{case_id}': external mask {path} not found; {fix}")
    mask = read_mask(path, label=label, case_id=case_id)
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        values = np.unique(sitk.GetArrayViewFromImage(read_image(path, case_id=case_id)))
        shown = ", ".join(f"{v:g}" for v in values[:8])
        raise ExternalMaskError(
            f"case '{case_id}': external mask {path} holds no voxel == {label} (segment.external.label), "
            f"only {shown}: the other tool found no lesion, or the lesion has another label; {fix}"
        )
    ok, reason = same_grid(image, mask, tol_mm=grid_tolerance_mm)
    if ok:
        mask.CopyInformation(image)
        return mask
    moved = resample_to_reference(mask, image, sitk.sitkNearestNeighbor, 0)
    if not np.any(sitk.GetArrayViewFromImage(moved)):
        raise ExternalMaskError(
            f"case '{case_id}': external mask {path} is on another grid ({reason}) and none of its lesion "
            f"voxels falls inside the CT {case_id}; give the mask predicted on this case's CT"
        )
    log.warning("case '%s': external mask on another grid (%s); mapped onto the CT grid", case_id, reason)
    return moved


def import_external_masks(
    cases: Sequence[Case],
    external_dir: str | Path,
    out_dir: str | Path,
    *,
    label: int,
    mask_label: int,
    grid_tolerance_mm: float,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Check, map and write every case's external mask into ``out_dir``; one metrics row per case.

    Args:
        cases: the manifest's cases (their CTs, and manual masks as the reference).
        external_dir: folder of ``<case_id>.nii.gz`` label maps.
        out_dir: the automatic-mask folder (``segment.masks_dir``), replaced atomically once
            every case has its mask.
        label: lesion value in the external label maps (``segment.external.label``).
        mask_label: lesion value of the written masks and of the manual label maps (``data.mask_label``).
        grid_tolerance_mm: ``validate.grid_tolerance_mm``.
        show_progress: show a progress bar.

    Returns:
        Per case: ``case_id``, ``fold`` (None: no folds) and :func:`case_metrics`' Dice, HD95 (mm)
        and volumes (mL) against the manual mask.

    Raises:
        ExternalMaskError: every missing, empty or out-of-image case, listed in one message
            (the folder is then left as it was).
    """
    external_dir = Path(external_dir)
    if not external_dir.is_dir():
        raise ExternalMaskError(
            f"external masks folder {external_dir} not found (segment.external.masks_dir, relative to "
            "data.cohort_dir); put one <case_id>.nii.gz per case there"
        )
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    with atomic_path(out_dir, is_dir=True) as tmp:
        for case in progress(cases, total=len(cases), desc="external masks", disable=not show_progress):
            cid = case.case_id
            try:
                image = read_image(case.image, case_id=cid)
                mask = load_external_mask(external_mask_path(external_dir, cid), image, label=label, case_id=cid,
                                          grid_tolerance_mm=grid_tolerance_mm)
            except ExternalMaskError as exc:
                problems.append(str(exc))
                continue
            write_image(sitk.Cast(mask * int(mask_label), sitk.sitkUInt8), Path(tmp) / f"{cid}{EXTERNAL_SUFFIX}")
            ref = case.mask_ref("manual")
            manual = read_lesion_mask(ref.path, image, label=mask_label, roi=ref.roi, seg_segment=ref.seg_segment,
                                      case_id=cid, grid_tolerance_mm=grid_tolerance_mm, reference_image_path=case.image)
            rows.append({"case_id": cid, "fold": None,
                         **case_metrics(mask, manual, cid, grid_tolerance_mm=grid_tolerance_mm)})
        if problems:
            raise ExternalMaskError(f"{len(problems)} of {len(cases)} case(s) lack a usable external mask: "
                                    + "; ".join(problems))
    log.info("external masks: %d cases from %s written to %s", len(rows), external_dir, out_dir)
    return rows
