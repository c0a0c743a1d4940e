"""Segmentation data: the preprocessed case table, volumes in memory, seeded MONAI transforms.

Preprocessed volumes are small (resampled to ~1 mm and cropped to the bone region), so the
whole cohort is held in memory as channel-first arrays ``(1, D, H, W)`` in SimpleITK array
order (z, y, x); ``roi_size`` is in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from bonemet.data.io import read_image, read_mask
from bonemet.data.manifest import Case
from bonemet.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import AugmentSpec

log = logging.getLogger(__name__)

PREPROCESSED_TABLE = "cases.csv"
FG_INDICES = "fg_indices"  # keys of the precomputed crop-centre candidates (with_crop_indices)
BG_INDICES = "bg_indices"


class SegmentationDataError(UserError, ValueError):
    """The preprocessed case table or one of its volumes is unusable."""


@dataclass(frozen=True)
class SegCase:
    """One case for segmentation.

    ``image``/``mask`` are the preprocessed volumes (training space); ``original_image`` and
    ``original_mask`` are the raw CT and manual mask (the grid the automatic mask is written on
    and evaluated against), with the manual mask's RTSTRUCT ROI / SEG segment when it is one.
    """

    case_id: str
    image: Path
    mask: Path
    original_image: Path | None = None
    original_mask: Path | None = None
    label: int | None = None
    original_roi: str | None = None
    original_seg_segment: int | str | None = None


def _resolve(value: str, base: Path) -> Path:
    path = Path(value)
    if path.is_absolute():
        return path
    if (base / path).exists():
        return base / path
    return path


def load_cases(
    preprocessed_dir: str | Path, originals: Mapping[str, tuple[Path, Path] | Case] | None = None
) -> list[SegCase]:
    """Read ``cases.csv`` of the preprocess stage into :class:`SegCase` objects.

    Args:
        preprocessed_dir: folder with ``cases.csv`` (columns case_id, label, image, mask); relative
            paths are resolved against this folder first, then the working directory.
        originals: case_id -> the manifest's :class:`~bonemet.data.manifest.Case` (raw image and
            manual mask with its ROI / segment), or a (raw image path, raw label-map mask path) pair.
    """
    preprocessed_dir = Path(preprocessed_dir)
    table_path = preprocessed_dir / PREPROCESSED_TABLE
    if not table_path.is_file():
        raise SegmentationDataError(f"{table_path}: preprocessed case table not found (run the preprocess stage)")
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    missing = {"case_id", "image", "mask"} - set(table.columns)
    if missing:
        raise SegmentationDataError(f"{table_path}: expected columns case_id,image,mask; missing {sorted(missing)}")
    cases = []
    for row in table.to_dict("records"):
        cid = row["case_id"]
        orig = (originals or {}).get(cid)
        if originals is not None and orig is None:
            raise SegmentationDataError(f"case '{cid}': in {table_path} but not in the raw manifest")
        label = row.get("label", "")
        if isinstance(orig, Case):
            ref = orig.mask_ref("manual")
            image, mask, roi, seg_segment = orig.image, ref.path, ref.roi, ref.seg_segment
        else:
            image, mask = orig if orig else (None, None)
            roi = seg_segment = None
        cases.append(
            SegCase(
                case_id=cid,
                image=_resolve(row["image"], preprocessed_dir),
                mask=_resolve(row["mask"], preprocessed_dir),
                original_image=image,
                original_mask=mask,
                label=int(label) if str(label).strip() not in ("", "nan") else None,
                original_roi=roi,
                original_seg_segment=seg_segment,
            )
        )
    return cases


def load_volume(case: SegCase, with_label: bool = True) -> dict[str, Any]:
    """Load a preprocessed case as ``{"image": (1,D,H,W) float32, "label": (1,D,H,W) float32, "case_id"}``."""
    image = read_image(case.image, case_id=case.case_id, pixel_type=sitk.sitkFloat32)
    item: dict[str, Any] = {
        "case_id": case.case_id,
        "image": sitk.GetArrayFromImage(image)[None].astype(np.float32),
    }
    if with_label:
        mask = read_mask(case.mask, label=1, case_id=case.case_id)  # written 0/1 by the preprocess stage
        if mask.GetSize() != image.GetSize():
            raise SegmentationDataError(
                f"case '{case.case_id}': {case.mask} size {mask.GetSize()} != image size {image.GetSize()}"
            )
        item["label"] = sitk.GetArrayFromImage(mask)[None].astype(np.float32)
    return item


def train_transforms(
    roi_size: Sequence[int],
    augment: AugmentSpec,
    *,
    num_samples: int,
    seed: int,
    indexed: bool = False,
):
    """Seeded training augmentation (``segment.augment``): pad to the roi, ``num_samples``
    pos/neg-balanced crops per volume, flips, small rotations (degrees), intensity shift (offset
    in normalised units) and scale (fraction).

    With ``indexed`` the items come from :func:`with_crop_indices` (already padded, lesion and
    background voxel indices precomputed), which spares recomputing them for every crop: on a
    ~80x80x64 volume that search costs more than a CPU training step of the small networks.
    """
    from monai.transforms import (
        Compose,
        EnsureTyped,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    a = augment
    rad = float(np.deg2rad(a.rotate_range_deg))
    index_keys = {"fg_indices_key": FG_INDICES, "bg_indices_key": BG_INDICES} if indexed else {}
    pad = [] if indexed else [SpatialPadd(keys=keys, spatial_size=tuple(roi_size), mode="constant")]
    transform = Compose(
        [
            *pad,
            RandCropByPosNegLabeld(
                keys=keys, label_key="label", spatial_size=tuple(roi_size), pos=a.pos, neg=a.neg,
                num_samples=num_samples, image_key="image", image_threshold=0.0, **index_keys,
            ),
            RandFlipd(keys=keys, prob=a.flip_prob, spatial_axis=0),
            RandFlipd(keys=keys, prob=a.flip_prob, spatial_axis=1),
            RandFlipd(keys=keys, prob=a.flip_prob, spatial_axis=2),
            RandRotated(
                keys=keys, range_x=rad, range_y=rad, range_z=rad, prob=a.rotate_prob,
                mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True,
            ),
            RandScaleIntensityd(keys="image", factors=a.intensity_scale, prob=a.intensity_prob),
            RandShiftIntensityd(keys="image", offsets=a.intensity_shift, prob=a.intensity_prob),
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


def with_crop_indices(item: Mapping[str, Any], roi_size: Sequence[int]) -> dict[str, Any]:
    """``{"image", "label"}`` zero-padded to at least ``roi_size`` (voxels) plus the flat indices of
    lesion voxels and of background voxels with image > 0 (what ``RandCropByPosNegLabeld`` samples
    crop centres from), for ``train_transforms(..., indexed=True)``."""
    from monai.transforms import SpatialPad
    from monai.transforms.utils import map_binary_to_indices

    pad = SpatialPad(spatial_size=tuple(int(r) for r in roi_size), mode="constant")
    image = np.asarray(pad(np.asarray(item["image"])))
    label = np.asarray(pad(np.asarray(item["label"])))
    fg, bg = map_binary_to_indices(label, image, 0.0)
    return {"image": image, "label": label, FG_INDICES: np.asarray(fg), BG_INDICES: np.asarray(bg)}


def lesion_centred_crop(item: Mapping[str, Any], roi_size: Sequence[int]) -> dict[str, Any]:
    """A ``roi_size`` crop centred on the lesion's centre of mass (the volume centre when there is
    no lesion), zero-padded where the volume is smaller: a cheap fixed validation patch."""
    image, label = np.asarray(item["image"]), np.asarray(item["label"])
    spatial = image.shape[1:]
    fg = np.argwhere(label[0] > 0.5)
    centre = fg.mean(axis=0) if len(fg) else np.array(spatial) / 2.0
    out_img = np.zeros((image.shape[0], *roi_size), dtype=image.dtype)
    out_lab = np.zeros((label.shape[0], *roi_size), dtype=label.dtype)
    src, dst = [], []
    for c, size, roi in zip(centre, spatial, roi_size, strict=True):
        start = int(round(c - roi / 2.0))
        start = max(min(start, size - roi), 0) if size >= roi else -((roi - size) // 2)
        lo, hi = max(start, 0), min(start + roi, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out_img[(slice(None), *dst)] = image[(slice(None), *src)]
    out_lab[(slice(None), *dst)] = label[(slice(None), *src)]
    return {"case_id": item.get("case_id", ""), "image": out_img, "label": out_lab}
