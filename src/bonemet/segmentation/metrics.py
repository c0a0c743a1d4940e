"""Segmentation quality: Dice, HD95 (mm) and volume difference, on the original image grid.

All distances use the physical voxel spacing (mm), so masks on anisotropic grids are compared
correctly. HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the
two directed 95th-percentile surface distances. Empty masks are flagged rather than hidden:
an empty prediction against a non-empty reference has Dice 0 and HD95 = inf.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bonemet.data.io import same_grid
from bonemet.data.masks import dice, volume_ml
from bonemet.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["MaskGridError", "case_metrics", "dice", "hd95", "summarize", "surface_distances"]


class MaskGridError(UserError, ValueError):
    """Prediction and reference masks are not on the same grid."""


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a binary mask (the mask minus its 6-connected erosion)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return np.logical_and(mask, ~eroded)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface -> ref surface, ref surface -> pred surface).

    ``spacing`` is per array axis (for a SimpleITK array that is the image spacing reversed).
    Both masks must be non-empty. Work is limited to the bounding box of the union, which keeps
    the Euclidean distance transform exact (every surface voxel lies inside it).
    """
    pred = np.asarray(pred).astype(bool)
    ref = np.asarray(ref).astype(bool)
    union = np.logical_or(pred, ref)
    coords = np.argwhere(union)
    lo = np.maximum(coords.min(axis=0) - 1, 0)
    hi = np.minimum(coords.max(axis=0) + 2, union.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    sp, sr = _surface(pred[box]), _surface(ref[box])
    dist_to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return dist_to_ref[sp], dist_to_pred[sr]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm.

    ``spacing`` is per array axis in mm. NaN when both masks are empty (undefined) and inf
    when exactly one is empty (flagged, never silently averaged).
    """
    pred = np.asarray(pred).astype(bool)
    ref = np.asarray(ref).astype(bool)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return math.nan
    if has_pred != has_ref:
        return math.inf
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def case_metrics(pred: sitk.Image, ref: sitk.Image, case_id: str, *, grid_tolerance_mm: float) -> dict[str, Any]:
    """Dice, HD95 (mm) and volume difference (mL, %) of a predicted vs a reference mask.

    Both are binary SimpleITK masks on the same (original) grid, within ``grid_tolerance_mm``
    (``validate.grid_tolerance_mm``: the reference is the user's file); ``case_id`` names the
    case in errors. Volume difference is prediction minus reference; its percentage is relative to the
    reference (NaN for an empty reference).
    """
    ok, reason = same_grid(ref, pred, tol_mm=grid_tolerance_mm)
    if not ok:
        raise MaskGridError(f"case '{case_id}': predicted mask is not on the reference mask's grid: {reason}")
    p = sitk.GetArrayViewFromImage(pred) > 0
    r = sitk.GetArrayViewFromImage(ref) > 0
    spacing = tuple(float(s) for s in reversed(ref.GetSpacing()))  # array axis order (z, y, x)
    pred_ml = volume_ml(int(p.sum()), spacing)
    ref_ml = volume_ml(int(r.sum()), spacing)
    return {
        "case_id": case_id,
        "dice": dice(p, r),
        "hd95_mm": hd95(p, r, spacing),
        "pred_volume_ml": pred_ml,
        "ref_volume_ml": ref_ml,
        "volume_diff_ml": pred_ml - ref_ml,
        "volume_diff_pct": 100.0 * (pred_ml - ref_ml) / ref_ml if ref_ml > 0 else math.nan,
        "empty_prediction": not bool(p.any()),
    }


def _mean_sd(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return None, None, 0
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), sd, int(arr.size)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean/sd of Dice, HD95 and volume difference over cases (finite values only), with counts.

    ``hd95_n`` says over how many cases HD95 was finite; ``n_empty_predictions`` counts cases
    whose prediction was empty (their HD95 is inf and excluded from the mean).
    """
    out: dict[str, Any] = {"n_cases": len(rows)}
    for key, name in (("dice", "dice"), ("hd95_mm", "hd95"), ("volume_diff_ml", "volume_diff_ml"),
                      ("volume_diff_pct", "volume_diff_pct")):
        mean, sd, n = _mean_sd(float(r[key]) for r in rows)
        out[f"{name}_mean"] = mean
        out[f"{name}_sd"] = sd
        if name == "hd95":
            out["hd95_n"] = n
    dices = [float(r["dice"]) for r in rows]
    out["dice_median"] = float(np.median(dices)) if dices else None
    out["abs_volume_diff_ml_mean"] = _mean_sd(abs(float(r["volume_diff_ml"])) for r in rows)[0]
    out["n_empty_predictions"] = int(sum(bool(r["empty_prediction"]) for r in rows))
    return out


def dice_by_group(rows: Sequence[Mapping[str, Any]], labels: Mapping[str, int | None],
                  lesion_hu: Mapping[str, float | None] | None = None,
                  lesion_ml: Mapping[str, float | None] | None = None, n_groups: int = 4) -> dict[str, Any]:
    """The segmentation's error by class and by lesion: mean Dice per label, the gap between the
    labels (label 1 minus label 0), and per quartile of the lesions' median HU (lytic to blastic)
    and of their volume (mL).

    A classifier of automatic-mask features can learn where the segmenter fails instead of the
    lesion; a Dice that depends on the label says that it may. ``labels``, ``lesion_hu`` and
    ``lesion_ml`` map case ids (the plan's fingerprint has the lesions' HU and volume); cases
    without a value are left out of that grouping.
    """
    import pandas as pd

    table = pd.DataFrame([{"case_id": str(r["case_id"]), "dice": float(r["dice"])} for r in rows if "dice" in r])
    out: dict[str, Any] = {"by_label": {}, "label_dice_gap": None}
    if table.empty:
        return out
    table["label"] = table["case_id"].map(lambda c: labels.get(c))
    for label, group in table.dropna(subset=["label"]).groupby("label"):
        out["by_label"][str(int(label))] = {"n": len(group), "dice_mean": float(group["dice"].mean())}
    if {"0", "1"} <= set(out["by_label"]):
        out["label_dice_gap"] = out["by_label"]["1"]["dice_mean"] - out["by_label"]["0"]["dice_mean"]
    for key, values, unit in (("by_density_quartile", lesion_hu, "hu"), ("by_size_quartile", lesion_ml, "ml")):
        if not values:
            continue
        column = table["case_id"].map(lambda c, v=values: v.get(c))
        known = table.assign(value=pd.to_numeric(column, errors="coerce")).dropna(subset=["value"])
        if len(known) < n_groups:
            continue
        # equal-count groups by rank (ties split in case order), lowest values first
        known = known.sort_values(["value", "case_id"]).reset_index(drop=True)
        known["group"] = (known.index * n_groups) // len(known)
        out[key] = [{"quartile": int(g) + 1, f"{unit}_min": float(grp["value"].min()),
                     f"{unit}_max": float(grp["value"].max()), "n": len(grp), "dice_mean": float(grp["dice"].mean())}
                    for g, grp in known.groupby("group")]
    return out


def class_bias(case_rows: Sequence[Mapping[str, Any]], labels: Mapping[str, int | None],
               plan: Mapping[str, Any] | None, max_gap: float) -> dict[str, Any]:
    """:func:`dice_by_group` with the lesions' HU and volume from the plan's fingerprint (none without
    a plan), and ``max_gap`` (``segment.bias.max_dice_gap``); a warning when the labels' mean Dice
    differ by more than it."""
    measured = {str(c["case_id"]): c for c in ((plan or {}).get("fingerprint") or {}).get("cases", [])}
    bias = dice_by_group(case_rows, labels, {k: v.get("lesion_hu_median") for k, v in measured.items()},
                         {k: v.get("lesion_volume_ml") for k, v in measured.items()})
    gap = bias["label_dice_gap"]
    bias["max_dice_gap"] = max_gap
    if gap is not None and abs(gap) > max_gap:
        log.warning("mean Dice of label-1 lesions %.3f, of label-0 lesions %.3f: they differ by %.3f, more than "
                    "segment.bias.max_dice_gap %.2f; a classifier of automatic-mask features may learn the "
                    "segmenter's errors (Dice by lesion density in metrics/segmentation.json `bias`)",
                    bias["by_label"]["1"]["dice_mean"], bias["by_label"]["0"]["dice_mean"], abs(gap), max_gap)
    return bias


def bias_metrics(bias: Mapping[str, Any]) -> dict[str, float]:
    """The class bias as MLflow metrics (``dice_label_<k>``, ``label_dice_gap``, ``dice_density_q<k>``...)."""
    out = {f"dice_label_{k}": v["dice_mean"] for k, v in bias["by_label"].items()}
    if bias["label_dice_gap"] is not None:
        out["label_dice_gap"] = bias["label_dice_gap"]
    for key, name in (("by_density_quartile", "density"), ("by_size_quartile", "size")):
        out |= {f"dice_{name}_q{g['quartile']}": g["dice_mean"] for g in bias.get(key, [])}
    return out

