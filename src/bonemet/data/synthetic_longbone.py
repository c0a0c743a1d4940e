"""A second synthetic cohort generator, independent of the spine phantom: a long-bone shaft with
lesions in its marrow cavity, scanned with one explicit protocol (issue 23 §2).

Why a second generator: a segmenter tuned on :mod:`bonemet.data.synthetic` (vertebrae, ellipsoid
lesions, the phenotype latents) may have learnt that phantom. This one shares no code with it
beyond the file format and draws everything itself: other anatomy, other lesion shapes, another
density model, and the scanner as a :class:`ScanProtocol` given by the caller, so that a
benchmark can sweep slice thickness, noise, kernel and HU offset one cell at a time
(``benchmarks/segmentation_grid.py``).

Anatomy (mm, HU; per case a random centre, size and ellipticity): air around an elliptical limb
of subcutaneous fat and muscle; a bone shaft along z (elliptical cross-section whose radius flares
linearly along z) with a cortical shell (1200-1700 HU) around a marrow cavity (fatty to mixed
marrow, -60..40 HU, with a smooth texture).

Lesion (:class:`LesionModel`): inside the marrow cavity (a rim of ``LESION_RIM_MM`` kept from the
cortex), of an exact volume drawn log-uniformly from ``volume_ml``: the voxels of lowest score
``ellipsoid distance + lobulation x smooth noise``, the ellipsoid elongated along the shaft, with
an optional satellite ellipsoid (a union): irregular, lobulated shapes. Its density latent
``d`` in [0, 1] (Beta, mean ``density_mean[label]``: label 1 leans blastic, label 0 lytic, with
overlap) sets its contrast over the marrow geometrically between ``contrast_hu`` (strongly lytic:
soft tissue barely above the marrow; blastic: up to ~1000 HU above): lytic for d < 1/3, mixed
(a blotchy, heterogeneous texture) below 2/3, blastic above.

Scanner (:class:`ScanProtocol`): rendered on sub-slices of <= ``MAX_SUBSLICE_MM`` and averaged into
slices of ``slice_thickness_mm`` (slice profile), an in-plane Gaussian point-spread of
``kernel_sd_mm``, in-plane correlated noise of sd ``noise_sd_hu`` and ``hu_offset`` added. The mask
is the final grid's voxels most covered by the lesion, as many as its volume fills.

Output: ``manifest.csv`` (case_id,label,image,mask), ``images/*.nii.gz`` (int16 HU),
``masks/*.nii.gz`` (uint8, lesion = ``mask_label``) and ``cohort.json`` (the protocol, the lesion
model and per case the lesion's volume (mL, from the mask), mean HU (in the written image),
contrast over the marrow, density latent and class, and the scanner settings). Everything is drawn
from ``numpy.random.default_rng`` streams of ``(seed, case)`` in float64: the same seed writes
byte-identical files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bonemet.data.io import write_image
from bonemet.data.manifest import MANIFEST_NAME
from bonemet.data.synthetic_latents import SyntheticParamsError, check_counts
from bonemet.utils import json_rounded, write_json

__all__ = ["DENSITY_CLASSES", "LesionModel", "ScanProtocol", "generate_longbone_cohort", "render_longbone_case"]

GENERATOR = "bonemet.data.synthetic_longbone"
COHORT_JSON = "cohort.json"
MANIFEST_COLUMNS = ("case_id", "label", "image", "mask")
FOV_XY_MM = 80.0
FOV_Z_MM = 60.0
MAX_SUBSLICE_MM = 0.5
HU_CLIP = (-1024, 3071)
_STREAM_LABELS, _STREAM_CASE = 101, 202

# Anatomy (mm, HU)
AIR_HU = -1000.0
FAT_HU = (-110.0, -85.0)
MUSCLE_HU = (38.0, 55.0)
CORTEX_HU = (1200.0, 1700.0)
MARROW_HU = (-60.0, 40.0)
MARROW_TEXTURE_SD_HU = (8.0, 20.0)
MARROW_TEXTURE_SIGMA_MM = 1.5
BONE_RADIUS_MM = (15.0, 18.0)
BONE_ELLIPTICITY = (0.85, 1.0)
BONE_FLARE = (-0.12, 0.12)  # relative change of the bone's radius from the centre to an end of the field
BONE_CENTRE_MM = 4.0
CORTEX_MM = (2.5, 4.0)
SOFT_TISSUE_MM = (11.0, 15.0)
FAT_LAYER_MM = (3.0, 7.0)

# Lesion shape (mm) and texture
LESION_RIM_MM = 1.0
LESION_ELONGATION = (1.0, 1.8)  # semi-axis along the shaft over the in-plane mean
LESION_INPLANE_ASPECT = (0.8, 1.25)
LESION_OFFSET_FRACTION = 0.4  # centre within this fraction of the cavity's radius from its axis
LESION_Z_MM = 8.0
LOBULATION = (0.1, 0.35)
LOBE_SIGMA_FRACTION = 0.35  # lobulation noise correlation length over the lesion's radius
SATELLITE_PROBABILITY = 0.5
SATELLITE_SCALE = (0.4, 0.7)
LESION_TEXTURE_SIGMA_MM = 1.5
HETEROGENEITY = {"lytic": (0.05, 0.2), "mixed": (0.3, 0.6), "blastic": (0.1, 0.25)}
#: density class by the density latent d in [0, 1]: (upper bound of d, name)
DENSITY_CLASSES = ((1.0 / 3.0, "lytic"), (2.0 / 3.0, "mixed"), (math.inf, "blastic"))
DENSITY_CONCENTRATION = 4.0  # Beta(a, b) with a + b = this
NOISE_CORRELATION_VOX = 0.7  # in-plane correlation of the noise (voxels)


@dataclass(frozen=True)
class ScanProtocol:
    """One scanner protocol: every case of a cohort is scanned with it.

    slice_thickness_mm: slice thickness = z spacing (mm); pixel_spacing_mm: in-plane spacing (mm);
    noise_sd_hu: sd of the added noise (HU); kernel_sd_mm: in-plane Gaussian point-spread sd (mm,
    larger is a softer kernel); hu_offset: added to every voxel (HU, a calibration offset).
    """

    slice_thickness_mm: float
    pixel_spacing_mm: float
    noise_sd_hu: float
    kernel_sd_mm: float
    hu_offset: float

    def __post_init__(self) -> None:
        for name in ("slice_thickness_mm", "pixel_spacing_mm"):
            if not 0.1 <= getattr(self, name) <= 10.0:
                raise SyntheticParamsError(f"ScanProtocol.{name} must be in [0.1, 10] mm; found {getattr(self, name)}")
        for name in ("noise_sd_hu", "kernel_sd_mm"):
            if getattr(self, name) < 0:
                raise SyntheticParamsError(f"ScanProtocol.{name} must be >= 0; found {getattr(self, name)}")


@dataclass(frozen=True)
class LesionModel:
    """How lesions are drawn.

    volume_ml: (low, high) mL, log-uniform; contrast_hu: (strongly lytic, most blastic) lesion mean
    over the marrow's (HU, > 0), geometric in the density latent; density_mean: the density
    latent's mean for label 0 and label 1 (in (0, 1); label 1 leans blastic when larger).
    """

    volume_ml: tuple[float, float]
    contrast_hu: tuple[float, float]
    density_mean: tuple[float, float]

    def __post_init__(self) -> None:
        lo, hi = self.volume_ml
        if not 0 < lo <= hi <= 20.0:
            raise SyntheticParamsError(f"LesionModel.volume_ml must satisfy 0 < low <= high <= 20; found {self.volume_ml}")
        lytic, blastic = self.contrast_hu
        if not 0 < lytic <= blastic:
            raise SyntheticParamsError(f"LesionModel.contrast_hu must satisfy 0 < lytic <= blastic; found {self.contrast_hu}")
        if not all(0 < m < 1 for m in self.density_mean):
            raise SyntheticParamsError(f"LesionModel.density_mean must lie in (0, 1); found {self.density_mean}")


def density_class(density: float) -> str:
    """``lytic``, ``mixed`` or ``blastic`` for a density latent in [0, 1]."""
    return next(name for bound, name in DENSITY_CLASSES if density < bound)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _grid(protocol: ScanProtocol) -> dict[str, Any]:
    """The final grid and the fine (sub-slice) grid: coordinates (mm, centred), sizes, spacing."""
    px, thick = protocol.pixel_spacing_mm, protocol.slice_thickness_mm
    n_xy = max(8, round(FOV_XY_MM / px))
    n_z = max(4, round(FOV_Z_MM / thick))
    sub = math.ceil(thick / MAX_SUBSLICE_MM - 1e-9)
    xy = (np.arange(n_xy, dtype=np.float64) - (n_xy - 1) / 2.0) * px
    z_fine = (np.arange(n_z * sub, dtype=np.float64) - (n_z * sub - 1) / 2.0) * (thick / sub)
    z = (np.arange(n_z, dtype=np.float64) - (n_z - 1) / 2.0) * thick
    return {"xy": xy, "z_fine": z_fine, "z": z, "sub": sub, "n_z": n_z, "n_xy": n_xy,
            "spacing": (px, px, thick), "origin": (float(xy[0]), float(xy[0]), float(z[0]))}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: tuple[float, ...]) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to sd 1 (float64)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    return field / max(float(field.std()), 1e-12)


def _anatomy(rng: np.random.Generator, grid: dict[str, Any]) -> dict[str, Any]:
    """The limb and the bone shaft on the fine grid: HU (no lesion) and the marrow cavity mask."""
    z, y, x = np.meshgrid(grid["z_fine"], grid["xy"], grid["xy"], indexing="ij")
    cx, cy = (rng.uniform(-BONE_CENTRE_MM, BONE_CENTRE_MM) for _ in range(2))
    radius, ellipticity = _uniform(rng, BONE_RADIUS_MM), _uniform(rng, BONE_ELLIPTICITY)
    flare = 1.0 + _uniform(rng, BONE_FLARE) * z / (FOV_Z_MM / 2.0)
    cortex, soft, fat_layer = _uniform(rng, CORTEX_MM), _uniform(rng, SOFT_TISSUE_MM), _uniform(rng, FAT_LAYER_MM)
    # elliptical "radius" of each voxel about the shaft's axis (mm on the major axis)
    rho = np.sqrt((x - cx) ** 2 + ((y - cy) / ellipticity) ** 2)
    bone_r = radius * flare
    body = np.sqrt((x - cx * 0.5) ** 2 + ((y - cy * 0.5) / ellipticity) ** 2)
    body_r = radius + soft
    fat_hu, muscle_hu = _uniform(rng, FAT_HU), _uniform(rng, MUSCLE_HU)
    cortex_hu, marrow_hu = _uniform(rng, CORTEX_HU), _uniform(rng, MARROW_HU)
    texture_sd = _uniform(rng, MARROW_TEXTURE_SD_HU)
    hu = np.full(x.shape, AIR_HU)
    hu[body <= body_r] = fat_hu
    hu[body <= body_r - fat_layer] = muscle_hu
    hu[rho <= bone_r] = cortex_hu
    cavity = rho <= bone_r - cortex
    sigma = _sigma_vox(grid, MARROW_TEXTURE_SIGMA_MM)
    marrow = marrow_hu + texture_sd * _smooth_field(rng, x.shape, sigma)
    hu[cavity] = marrow[cavity]
    inner = rho <= bone_r - cortex - LESION_RIM_MM
    return {"hu": hu, "cavity": inner, "coords": (z, y, x), "axis": (cx, cy), "cavity_radius_mm": radius - cortex,
            "marrow_hu": marrow_hu, "ellipticity": ellipticity}


def _sigma_vox(grid: dict[str, Any], sigma_mm: float) -> tuple[float, float, float]:
    px, _, thick = grid["spacing"]
    return (sigma_mm / (thick / grid["sub"]), sigma_mm / px, sigma_mm / px)


def _lesion_score(rng: np.random.Generator, anatomy: dict[str, Any], grid: dict[str, Any],
                  volume_mm3: float) -> np.ndarray:
    """Per fine voxel, how deep inside the lesion it lies (low = inside): the normalised distance to
    a rotated ellipsoid (union with an optional satellite) plus lobulation noise."""
    z, y, x = anatomy["coords"]
    elongation = _uniform(rng, LESION_ELONGATION)
    r_mean = (volume_mm3 / (4.0 / 3.0 * math.pi * elongation)) ** (1.0 / 3.0)
    aspect, angle = _uniform(rng, LESION_INPLANE_ASPECT), rng.uniform(0.0, math.pi)
    offset = rng.uniform(0.0, LESION_OFFSET_FRACTION) * anatomy["cavity_radius_mm"]
    theta = rng.uniform(0.0, 2.0 * math.pi)
    centre = (rng.uniform(-LESION_Z_MM, LESION_Z_MM), anatomy["axis"][1] + offset * math.sin(theta),
              anatomy["axis"][0] + offset * math.cos(theta))
    axes = (r_mean * elongation, r_mean * math.sqrt(aspect), r_mean / math.sqrt(aspect))
    score = _ellipsoid_distance((z, y, x), centre, axes, angle)
    if rng.uniform() < SATELLITE_PROBABILITY:
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        scale = _uniform(rng, SATELLITE_SCALE)
        sat_centre = tuple(c + 0.8 * a * d for c, a, d in zip(centre, axes, direction, strict=True))
        sat = _ellipsoid_distance((z, y, x), sat_centre, tuple(a * scale for a in axes), angle)
        score = np.minimum(score, sat)
    sigma = _sigma_vox(grid, max(1.0, LOBE_SIGMA_FRACTION * r_mean))
    return score + _uniform(rng, LOBULATION) * _smooth_field(rng, score.shape, sigma)


def _ellipsoid_distance(coords: tuple[np.ndarray, ...], centre: tuple[float, ...], axes: tuple[float, ...],
                        angle: float) -> np.ndarray:
    """sqrt(sum((u_i / a_i)^2)) with u the offset from ``centre`` turned by ``angle`` in-plane."""
    dz, dy, dx = (c - c0 for c, c0 in zip(coords, centre, strict=True))
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    return np.sqrt((dz / axes[0]) ** 2 + (v / axes[1]) ** 2 + (u / axes[2]) ** 2)


def _lesion(rng: np.random.Generator, anatomy: dict[str, Any], grid: dict[str, Any], lesions: LesionModel,
            label: int) -> dict[str, Any]:
    """Draw the lesion's volume and density, select its fine voxels (exactly its volume, inside the
    cavity) and paint its HU into ``anatomy['hu']``; the lesion's record and its fine mask."""
    lo, hi = lesions.volume_ml
    volume_ml = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    mean = lesions.density_mean[int(label)]
    density = float(rng.beta(mean * DENSITY_CONCENTRATION, (1.0 - mean) * DENSITY_CONCENTRATION))
    lytic, blastic = lesions.contrast_hu
    contrast = lytic * (blastic / lytic) ** density
    kind = density_class(density)
    heterogeneity = _uniform(rng, HETEROGENEITY[kind])
    px, _, thick = grid["spacing"]
    fine_voxel_mm3 = px * px * thick / grid["sub"]
    score = _lesion_score(rng, anatomy, grid, volume_ml * 1000.0)
    inside = anatomy["cavity"]
    n_voxels = min(int(inside.sum()), max(1, round(volume_ml * 1000.0 / fine_voxel_mm3)))
    threshold = np.partition(score[inside], n_voxels - 1)[n_voxels - 1]
    fine_mask = inside & (score <= threshold)
    texture = np.tanh(_smooth_field(rng, score.shape, _sigma_vox(grid, LESION_TEXTURE_SIGMA_MM)))
    lesion_hu = anatomy["marrow_hu"] + contrast * (1.0 + heterogeneity * texture)
    anatomy["hu"][fine_mask] = lesion_hu[fine_mask]
    record = {"lesion_volume_ml_drawn": volume_ml, "density": density, "density_class": kind,
              "lesion_contrast_hu": contrast, "heterogeneity": heterogeneity,
              "lesion_hu_nominal": anatomy["marrow_hu"] + contrast}
    return {"record": record, "fine_mask": fine_mask, "score": score, "volume_ml": volume_ml}


def _scan(rng: np.random.Generator, fine_hu: np.ndarray, grid: dict[str, Any], protocol: ScanProtocol) -> np.ndarray:
    """Slice averaging, in-plane point spread, correlated noise, offset: the int16 HU volume."""
    shape = (grid["n_z"], grid["sub"], grid["n_xy"], grid["n_xy"])
    image = fine_hu.reshape(shape).mean(axis=1)
    px = protocol.pixel_spacing_mm
    if protocol.kernel_sd_mm > 0:
        image = ndimage.gaussian_filter(image, (0.0, protocol.kernel_sd_mm / px, protocol.kernel_sd_mm / px))
    noise = ndimage.gaussian_filter(rng.standard_normal(image.shape), (0.0, NOISE_CORRELATION_VOX, NOISE_CORRELATION_VOX))
    image = image + protocol.noise_sd_hu * noise / max(float(noise.std()), 1e-12) + protocol.hu_offset
    return np.clip(np.rint(image), *HU_CLIP).astype(np.int16)


def _final_mask(lesion: dict[str, Any], grid: dict[str, Any]) -> np.ndarray:
    """The final grid's lesion mask: its voxels ranked by lesion coverage (ties by mean score), as
    many as the drawn volume fills."""
    shape = (grid["n_z"], grid["sub"], grid["n_xy"], grid["n_xy"])
    coverage = lesion["fine_mask"].reshape(shape).mean(axis=1).ravel()
    score = lesion["score"].reshape(shape).mean(axis=1).ravel()
    px, _, thick = grid["spacing"]
    candidates = int((coverage > 0).sum())
    n_voxels = min(candidates, max(1, round(lesion["volume_ml"] * 1000.0 / (px * px * thick))))
    order = np.lexsort((score, -coverage))[:n_voxels]
    mask = np.zeros(coverage.shape, dtype=bool)
    mask[order] = True
    return mask.reshape((grid["n_z"], grid["n_xy"], grid["n_xy"]))


def render_longbone_case(seed: int, index: int, label: int, protocol: ScanProtocol,
                         lesions: LesionModel) -> dict[str, Any]:
    """Case ``index`` of the cohort ``seed``: ``image`` (int16 HU, z y x), ``mask`` (bool), ``spacing``
    and ``origin`` (x y z mm) and its ``record`` (cohort.json's entry)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM_CASE, int(index)]))
    grid = _grid(protocol)
    anatomy = _anatomy(rng, grid)
    lesion = _lesion(rng, anatomy, grid, lesions, label)
    mask = _final_mask(lesion, grid)
    image = _scan(rng, anatomy["hu"], grid, protocol)
    px, _, thick = grid["spacing"]
    record = {
        "case_id": f"lb_{index:03d}", "label": int(label),
        "lesion_volume_ml": float(mask.sum()) * px * px * thick / 1000.0,
        "lesion_hu_mean": float(image[mask].mean()) if mask.any() else None,
        **lesion["record"], "marrow_hu": anatomy["marrow_hu"],
        **{k: float(v) for k, v in dataclasses.asdict(protocol).items()},
    }
    return {"image": image, "mask": mask, "spacing": grid["spacing"], "origin": grid["origin"], "record": record}


def _to_image(array: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...], pixel_type: int) -> sitk.Image:
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel_type)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    return image


def generate_longbone_cohort(out_dir: str | Path, *, n_cases: int, n_positive: int, seed: int,
                             protocol: ScanProtocol, lesions: LesionModel, mask_label: int,
                             overwrite: bool = False) -> dict[str, Any]:
    """Write a long-bone cohort scanned with ``protocol`` into ``out_dir``; its cohort.json (summary
    and cases).

    Raises:
        SyntheticParamsError: invalid counts or ``mask_label``, or ``out_dir`` not empty without
            ``overwrite``.
    """
    check_counts(n_cases, n_positive)
    if not 1 <= int(mask_label) <= 255:
        raise SyntheticParamsError(f"mask_label must be in 1..255 (uint8 label map); found {mask_label}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise SyntheticParamsError(f"{out_dir}: output folder is not empty (expected empty or missing)")
    for sub in ("images", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    labels = np.zeros(n_cases, dtype=np.int64)
    labels[:n_positive] = 1
    labels = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM_LABELS, n_cases])).permutation(labels)
    lines, cases = [",".join(MANIFEST_COLUMNS)], []
    for index, label in enumerate(labels):
        case = render_longbone_case(seed, index, int(label), protocol, lesions)
        cid = case["record"]["case_id"]
        image_path, mask_path = f"images/{cid}.nii.gz", f"masks/{cid}.nii.gz"
        write_image(_to_image(case["image"], case["spacing"], case["origin"], sitk.sitkInt16), out_dir / image_path)
        label_map = case["mask"].astype(np.uint8) * np.uint8(mask_label)
        write_image(_to_image(label_map, case["spacing"], case["origin"], sitk.sitkUInt8), out_dir / mask_path)
        lines.append(f"{cid},{int(label)},{image_path},{mask_path}")
        cases.append(case["record"])
    (out_dir / MANIFEST_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
    cohort = {"generator": GENERATOR, "format_version": 1, "seed": int(seed), "n_cases": int(n_cases),
              "n_positive": int(n_positive), "mask_label": int(mask_label),
              "protocol": dataclasses.asdict(protocol), "lesion_model": dataclasses.asdict(lesions), "cases": cases}
    cohort = json_rounded(cohort)
    write_json(out_dir / COHORT_JSON, cohort)
    return cohort
