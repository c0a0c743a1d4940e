"""Figure of a few cohort cases: axial slice through the lesion with mask contours, sagittal view.

One drawing for the synthetic cohort's ``--figure`` and the report's example cases: the manual
contour in red, the second reader's (annotator) in dashed yellow, or the automatic mask's in cyan.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from bonemet.data.dicom_masks import read_lesion_mask
from bonemet.data.io import read_image, read_mask
from bonemet.data.manifest import read_manifest

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DISPLAY_WINDOW_HU = (-250.0, 1250.0)


def default_case_ids(cohort_dir: str | Path, n: int) -> list[str]:
    """The first ``n`` cases of the manifest, alternating labels where possible."""
    cases = read_manifest(cohort_dir)
    ones = [c.case_id for c in cases if c.label == 1]
    zeros = [c.case_id for c in cases if c.label == 0]
    return [cid for pair in zip(ones, zeros, strict=False) for cid in pair][:n] or [c.case_id for c in cases[:n]]


def cases_figure(
    cohort_dir: str | Path, case_ids: Sequence[str], *, mask_label: int, grid_tolerance_mm: float,
    auto_masks_dir: str | Path | None = None, titles: Mapping[str, str] | None = None,
    roi: str | None = None, seg_segment: int | str | None = None, pseudonym_key: bytes | None = None,
) -> Figure:
    """One row per case: the axial slice through the lesion's centre and the sagittal slice, with contours.

    Masks are read as every stage reads them (label map, RTSTRUCT or SEG, within
    ``grid_tolerance_mm`` of their CT's grid). With ``auto_masks_dir`` (the segment stage's
    ``<case_id>.nii.gz`` label maps, lesion = ``mask_label``) the automatic contour is drawn in
    cyan beside the manual one in red; without it the annotator's, when the case has one.
    ``titles``: an extra caption per case id (e.g. its Dice). With ``pseudonym_key`` the case ids
    are the pseudonyms every stage writes (``data.pseudonymize``).
    """
    import matplotlib.pyplot as plt

    by_id = {c.case_id: c for c in read_manifest(cohort_dir, roi=roi, seg_segment=seg_segment, pseudonym_key=pseudonym_key)}
    unknown = [cid for cid in case_ids if cid not in by_id]
    if unknown:
        raise ValueError(f"{cohort_dir}: case id(s) {', '.join(unknown)} not in the manifest")
    fig, axes = plt.subplots(len(case_ids), 2, figsize=(8, 3.6 * len(case_ids)), squeeze=False)
    for row, cid in enumerate(case_ids):
        case = by_id[cid]
        image = read_image(case.image, case_id=cid)
        arr = sitk.GetArrayFromImage(image).astype(np.float32)

        def lesion(kind: str, case=case, image=image, cid=cid) -> np.ndarray:
            ref = case.mask_ref(kind)
            mask = read_lesion_mask(ref.path, image, label=mask_label, roi=ref.roi, seg_segment=ref.seg_segment, case_id=cid,
                                    grid_tolerance_mm=grid_tolerance_mm, reference_image_path=case.image)
            return sitk.GetArrayFromImage(mask).astype(bool)

        mask = lesion("manual")
        other, other_style = None, {}
        auto_path = Path(auto_masks_dir) / f"{cid}.nii.gz" if auto_masks_dir is not None else None
        if auto_path is not None and auto_path.is_file():
            other = sitk.GetArrayFromImage(read_mask(auto_path, label=mask_label, case_id=cid)).astype(bool)
            other_style = {"colors": "cyan", "linewidths": 0.8}
        elif auto_path is None and case.annotator_mask is not None and case.annotator_mask.exists():
            other = lesion("annotator")
            other_style = {"colors": "yellow", "linewidths": 0.6, "linestyles": "dashed"}
        if other is not None and other.shape != mask.shape:
            raise ValueError(f"case '{cid}': the mask {auto_path} is not on the CT's grid ({other.shape} vs {mask.shape})")
        sx, sy, sz = image.GetSpacing()
        zz, yy, xx = np.nonzero(mask) if mask.any() else [np.array([s // 2]) for s in mask.shape]
        k, j = int(np.median(zz)), int(np.median(xx))
        caption = f"{cid} label {case.label}" + (f", {titles[cid]}" if titles and cid in titles else "")
        for col, (plane, aspect, origin) in enumerate(((lambda a, k=k: a[k], sy / sx, "upper"),
                                                       (lambda a, j=j: a[:, :, j], sz / sy, "lower"))):
            ax = axes[row, col]
            ax.imshow(plane(arr), cmap="gray", vmin=DISPLAY_WINDOW_HU[0], vmax=DISPLAY_WINDOW_HU[1], aspect=aspect,
                      origin=origin)
            if plane(mask).any():
                ax.contour(plane(mask), levels=[0.5], colors="red", linewidths=0.8, origin=origin)
            if other is not None and plane(other).any():
                ax.contour(plane(other), levels=[0.5], origin=origin, **other_style)
            ax.set_title(f"{caption}: axial z={k}" if col == 0
                         else f"sagittal x={j} (spacing {sx:.2f}x{sy:.2f}x{sz:.2f} mm)", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return fig


def plot_cohort_cases(
    cohort_dir: str | Path, case_ids: list[str] | None, path: str | Path, *, mask_label: int,
    grid_tolerance_mm: float, n: int = 4,
) -> Path:
    """Write a PNG with one row per case: axial slice (manual contour red, annotator yellow) and sagittal view.

    ``case_ids`` None: the first ``n`` cases, alternating labels where possible.
    """
    import matplotlib.pyplot as plt

    ids = case_ids if case_ids is not None else default_case_ids(cohort_dir, n)
    fig = cases_figure(cohort_dir, ids, mask_label=mask_label, grid_tolerance_mm=grid_tolerance_mm)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    log.info("wrote figure of %d case(s) to %s", len(ids), path)
    return path
