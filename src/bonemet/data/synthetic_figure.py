"""Figure of a few cohort cases: axial slice through the lesion with mask contours, sagittal view."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bonemet.data.dicom_masks import read_lesion_mask
from bonemet.data.io import read_image
from bonemet.data.manifest import read_manifest

log = logging.getLogger(__name__)

DISPLAY_WINDOW_HU = (-250.0, 1250.0)


def plot_cohort_cases(
    cohort_dir: str | Path, case_ids: list[str] | None, path: str | Path, *, mask_label: int,
    grid_tolerance_mm: float, n: int = 4,
) -> Path:
    """Write a PNG with one row per case: axial slice (manual contour red, annotator yellow) and sagittal view.

    Works on any cohort in the bring-your-own format (masks read as every stage reads them,
    within ``grid_tolerance_mm`` of their CT's grid). ``case_ids`` None: the first ``n`` cases,
    alternating labels where possible.
    """
    import matplotlib.pyplot as plt

    cases = read_manifest(cohort_dir)
    by_id = {c.case_id: c for c in cases}
    if case_ids is None:
        ones = [c.case_id for c in cases if c.label == 1]
        zeros = [c.case_id for c in cases if c.label == 0]
        case_ids = [cid for pair in zip(ones, zeros, strict=False) for cid in pair][:n] or [
            c.case_id for c in cases[:n]
        ]
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
            mask = read_lesion_mask(ref.path, image, label=mask_label, roi=ref.roi, segment=ref.segment, case_id=cid,
                                    grid_tolerance_mm=grid_tolerance_mm, reference_image_path=case.image)
            return sitk.GetArrayFromImage(mask).astype(bool)

        mask = lesion("manual")
        annot = lesion("annotator") if case.annotator_mask is not None and case.annotator_mask.exists() else None
        sx, sy, sz = image.GetSpacing()
        zz, yy, xx = np.nonzero(mask) if mask.any() else [np.array([s // 2]) for s in mask.shape]
        k, j = int(np.median(zz)), int(np.median(xx))
        ax = axes[row, 0]
        ax.imshow(arr[k], cmap="gray", vmin=DISPLAY_WINDOW_HU[0], vmax=DISPLAY_WINDOW_HU[1], aspect=sy / sx)
        if mask[k].any():
            ax.contour(mask[k], levels=[0.5], colors="red", linewidths=0.8)
        if annot is not None and annot[k].any():
            ax.contour(annot[k], levels=[0.5], colors="yellow", linewidths=0.6, linestyles="dashed")
        ax.set_title(f"{cid} label {case.label}: axial z={k}", fontsize=9)
        ax.axis("off")
        ax = axes[row, 1]
        sag = arr[:, :, j]
        ax.imshow(
            sag,
            cmap="gray",
            vmin=DISPLAY_WINDOW_HU[0],
            vmax=DISPLAY_WINDOW_HU[1],
            aspect=sz / sy,
            origin="lower",
        )
        if mask[:, :, j].any():
            ax.contour(mask[:, :, j], levels=[0.5], colors="red", linewidths=0.8, origin="lower")
        ax.set_title(f"sagittal x={j} (spacing {sx:.2f}x{sy:.2f}x{sz:.2f} mm)", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    log.info("wrote figure of %d case(s) to %s", len(case_ids), path)
    return path
