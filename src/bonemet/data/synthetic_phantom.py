"""Rendering one synthetic lumbar-spine CT (HU) with its lesion mask and an annotator mask.

The anatomy is built from analytic shapes in an "anatomy frame" (mm; x patient left, y
posterior, z superior, LPS-like), rotated and shifted per case:

* fat background (-100 HU) with psoas and paraspinal muscles (~45 HU), aorta and IVC
  (~40 HU), a bowel loop with a gas pocket (air, ~-950 HU);
* three vertebral bodies (the middle one whole, its neighbours cut by the field of view):
  superellipse cross-section, slightly concave endplates, a cortical shell (1000-1500 HU)
  and textured trabecular bone (band-pass random field, ~150-400 HU);
* intervertebral discs (annulus ~95 HU, nucleus ~70 HU), the spinal canal (~15 HU);
* posterior elements (pedicles, laminae, spinous, articular and transverse processes) with a
  cortical shell;
* one lesion inside the middle vertebral body: an ellipsoid of mean radius r whose elongation
  and lobulated boundary grow with the margin irregularity, filled with a mean HU set by the
  density latent (lytic: below the bone; blastic: above it; never equal) plus a smooth internal
  texture whose amplitude is set by the heterogeneity latent (reflected at a limit so that no
  lesion voxel reaches the bone's mean HU: the lesion stays segmentable). A 1.5 mm trabecular
  rim separates the lesion from the cortex; lesions larger than the body are cut to its
  trabecular compartment.

The scanner is simulated by rendering at <= 1 mm along z and averaging into slices of the
case's thickness (slice profile), an in-plane Gaussian point-spread function, additive
noise and a small HU offset. The "manual" mask is the set of voxels at least half covered by
the lesion; the "annotator" mask moves that boundary by a smooth random field of ~1 mm.

Determinism across machines: geometry, transcendental functions (power, exp, tanh) and
reductions are computed in float64, so that CPU-specific SIMD code paths (whose results can
differ in the last bits) cannot flip a voxel of the int16 output; float32 is used only for
arrays built from exact operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bonemet.data.masks import volume_ml
from bonemet.data.synthetic_latents import CaseParams

FOV_XY_MM = 80.0  # in-plane field of view (mm)
FOV_Z_MM = 60.0  # field of view along z (mm)
MAX_SUBSLICE_MM = 1.0  # render along z at this resolution or finer, then average into slices
HU_CLIP = (-1024, 3071)

# Anatomy (mm at scale 1, HU).
BODY_HALF_WIDTH = 23.0
BODY_HALF_DEPTH_ANT = 16.5
BODY_HALF_DEPTH_POST = 13.0
BODY_CENTRE_Y = -12.0
BODY_HALF_HEIGHT = 13.5
DISC_HALF_HEIGHT = 5.0
ENDPLATE_CONCAVITY = 0.06
CORTEX_MM = 1.2
POSTERIOR_CORTEX_MM = 1.5
FAT_HU = -100.0
MUSCLE_HU = 48.0
BLOOD_HU = 40.0
AIR_HU = -950.0
CANAL_HU = 15.0
DISC_ANNULUS_HU = 95.0
DISC_NUCLEUS_HU = 70.0
POSTERIOR_INTERIOR_EXTRA_HU = 80.0
TRABECULAR_SIGMAS_MM = (0.6, 1.8)  # band-pass texture of trabecular bone

# Lesion phenotype mapping (latent -> image), HU and mm. The lesion's mean HU is absolute, not
# relative to the case's trabecular bone: a lytic lesion is soft tissue replacing bone, whatever
# the bone's density was (relative means made the bone's 190-290 HU range a nuisance as large as
# two units of the density latent for lytic lesions).
LYTIC_HU_AT_ZERO = 60.0  # lytic mean = this + slope * density (density < 0)
LYTIC_SLOPE_HU = 80.0
LYTIC_FLOOR_HU = -150.0
BLASTIC_HU_AT_ZERO = 500.0  # blastic mean = this + slope * density (density >= 0)
BLASTIC_SLOPE_HU = 250.0
BLASTIC_CEILING_HU = 1600.0
HETEROGENEITY_FLOOR_HU = 10.0  # internal texture sd = floor + base * exp(gain * heterogeneity)
HETEROGENEITY_BASE_HU = 45.0
HETEROGENEITY_GAIN = 0.9
LESION_TEXTURE_SIGMA_MM = 1.8  # correlation length of the internal texture (at least half a slice along z)
LYTIC_MAX_BELOW_BONE_HU = 40.0  # a lytic lesion's texture never rises above bone mean - this
BLASTIC_MIN_ABOVE_BONE_HU = 80.0  # a blastic lesion's texture never falls below bone mean + this
IRREGULARITY_MAX = 0.45  # irregularity amplitude = max * sigmoid(gain * irregularity)
IRREGULARITY_GAIN = 1.5
# An irregular lesion is both elongated and lobulated. Elongation: semi-axes r * exp(k * amp),
# r, r * exp(-k * amp) (volume kept), so flatness runs from ~0.95 to ~0.35 with the latent: a
# global shape that automatic masks reproduce (ICC >= 0.9 against the manual mask), where the
# lobulation alone (sphericity) did not pass the study's ICC filter. Lobes on top: relative
# amplitude LOBE_FRACTION * amp.
ELONGATION_PER_AMPLITUDE = 1.5
LOBE_FRACTION = 0.5
LOBES = 14
LOBE_CONCENTRATION = 5.0
# The long axis lies along x (the vertebral body's widest extent), the short one along z, each
# turned by a random angle of this sd (degrees) about every axis.
LESION_ORIENTATION_SD_DEG = 20.0
LESION_MARGIN_MM = 1.0  # keep the nominal ellipsoid this far inside the trabecular compartment
LESION_RIM_MM = 1.5  # trabecular rim kept between lesion and cortex (a blastic lesion never fuses with it)

# Annotator boundary perturbation (mm).
ANNOTATOR_FIELD_SD_MM = 0.9
ANNOTATOR_MIN_VOXELS = 0.5
ANNOTATOR_FIELD_SIGMA_MM = 3.0
ANNOTATOR_BIAS_SD_MM = 0.3


@dataclass(frozen=True)
class RenderedCase:
    """One rendered case: arrays in (z, y, x) order and the grid in SimpleITK (x, y, z) order."""

    image: np.ndarray  # int16 HU
    manual: np.ndarray  # bool lesion mask
    annotator: np.ndarray  # bool annotator mask
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    summary: dict


def lesion_mean_hu(density: float, bone_mean_hu: float) -> float:
    """Lesion mean HU from the density latent: lytic below, blastic above the bone, never equal.

    The mean is absolute (``LYTIC_HU_AT_ZERO`` / ``BLASTIC_HU_AT_ZERO`` plus a slope times the
    latent); ``bone_mean_hu`` only keeps it ``LYTIC_MAX_BELOW_BONE_HU`` below or
    ``BLASTIC_MIN_ABOVE_BONE_HU`` above the bone, so that the lesion stays segmentable.
    """
    if density < 0:
        mean = max(LYTIC_FLOOR_HU, LYTIC_HU_AT_ZERO + LYTIC_SLOPE_HU * density)
        return min(mean, bone_mean_hu - LYTIC_MAX_BELOW_BONE_HU)
    mean = min(BLASTIC_CEILING_HU, BLASTIC_HU_AT_ZERO + BLASTIC_SLOPE_HU * density)
    return max(mean, bone_mean_hu + BLASTIC_MIN_ABOVE_BONE_HU)


def lesion_texture_sd_hu(heterogeneity: float) -> float:
    """Internal texture sd (HU) from the heterogeneity latent."""
    return HETEROGENEITY_FLOOR_HU + HETEROGENEITY_BASE_HU * math.exp(HETEROGENEITY_GAIN * heterogeneity)


def irregularity_amplitude(irregularity: float) -> float:
    """Irregularity amplitude (elongation and lobulation of the margin) from the latent."""
    return IRREGULARITY_MAX / (1.0 + math.exp(-IRREGULARITY_GAIN * irregularity))


def _superellipse(x, y, cx, cy, ax, ay_neg, ay_pos=None, p=2.0):
    """Approximate signed distance (mm, < 0 inside) to a superellipse; ``ay`` may differ either side of cy."""
    ay = ay_neg if ay_pos is None else np.where(y < cy, ay_neg, ay_pos)
    q = (np.abs(x - cx) / ax) ** p + (np.abs(y - cy) / ay) ** p
    return (q ** (1.0 / p) - 1.0) * np.minimum(ax, ay), q


def _unit_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit sd (float32)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    sd = float(field.std(dtype=np.float64))
    return field / (sd if sd > 0 else 1.0)


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


class _Lobes:
    """A smooth random function on the unit sphere with zero mean and unit sd (lobulated margin)."""

    def __init__(self, rng: np.random.Generator):
        dirs = rng.standard_normal((LOBES, 3))
        self.dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
        self.weights = rng.standard_normal(LOBES)
        ref = self._raw(_fibonacci_sphere(2000))
        self.mean, self.sd = float(ref.mean()), float(ref.std())

    def _raw(self, u: np.ndarray) -> np.ndarray:
        return np.exp(LOBE_CONCENTRATION * (u @ self.dirs.T - 1.0)) @ self.weights

    def __call__(self, u: np.ndarray) -> np.ndarray:
        return (self._raw(u) - self.mean) / self.sd


def _soft_tissue(xa: np.ndarray, ya: np.ndarray, s: float, gas_side: int) -> np.ndarray:
    """The in-plane soft tissue (HU, float32) at anatomy-frame coordinates ``xa``, ``ya`` (mm):
    fat, paraspinal and psoas muscles, aorta and vena cava, a bowel loop with gas on ``gas_side``;
    ``s`` is the anatomy scale."""
    tissue = np.full(xa.shape, FAT_HU, dtype=np.float32)
    for side in (-1, 1):
        tissue[_superellipse(xa, ya, side * 34 * s, BODY_CENTRE_Y * s + 2 * s, 9 * s, 12 * s)[0] <= 0] = (
            MUSCLE_HU
        )
        tissue[_superellipse(xa, ya, side * 18 * s, 30 * s, 12 * s, 11 * s)[0] <= 0] = MUSCLE_HU
    tissue[_superellipse(xa, ya, 10 * s, -38 * s, 10 * s, 10 * s)[0] <= 0] = BLOOD_HU
    tissue[_superellipse(xa, ya, -13 * s, -40 * s, 7 * s, 6 * s)[0] <= 0] = BLOOD_HU - 2
    gx = gas_side * 30 * s
    tissue[_superellipse(xa, ya, gx, -34 * s, 8 * s, 7 * s)[0] <= 0] = MUSCLE_HU - 13
    tissue[_superellipse(xa, ya, gx, -34 * s, 6 * s, 4.5 * s)[0] <= 0] = AIR_HU
    return tissue


def _vertebra_distances(zf: np.ndarray, rho_xy: np.ndarray, q_xy: np.ndarray,
                        posterior_parts: Sequence[tuple[np.ndarray, float, float]],
                        s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed distances (mm, < 0 inside) on the fine z grid ``zf`` to the three vertebral bodies
    (concave endplates), to the middle body alone, and to the posterior elements."""
    period = 2 * (BODY_HALF_HEIGHT + DISC_HALF_HEIGHT) * s
    z0 = 0.0
    half_h = BODY_HALF_HEIGHT * s * (1.0 - ENDPLATE_CONCAVITY * (1.0 - np.clip(q_xy, 0.0, 1.0)))
    rho_body = None
    rho_body0 = None
    rho_post = None
    for k in (-1, 0, 1):
        zk = z0 + k * period
        rz = np.abs(zf - zk)[:, None, None] - half_h[None]
        rk = np.maximum(rho_xy[None], rz)
        rho_body = rk if rho_body is None else np.minimum(rho_body, rk)
        if k == 0:
            rho_body0 = rk
        for rho_part, z_centre, z_half in posterior_parts:
            rp = np.maximum(rho_part[None], (np.abs(zf - zk - z_centre) - z_half)[:, None, None])
            rho_post = rp if rho_post is None else np.minimum(rho_post, rp)
    return rho_body, rho_body0, rho_post


def _trabecular_band(rng: np.random.Generator, rho_xy: np.ndarray, n_z: int,
                     spacing_zyx: tuple[float, float, float]) -> tuple[int, int, int, int, np.ndarray]:
    """Band-passed trabecular texture (unit sd, float32) over the bodies' in-plane bounding box:
    the box (y0, y1, x0, x1) and the texture, drawn from ``rng``."""
    yy, xx = np.nonzero(rho_xy <= 0)
    y0, y1, x0, x1 = yy.min(), yy.max() + 1, xx.min(), xx.max() + 1
    sig_lo = [max(TRABECULAR_SIGMAS_MM[0] / d, 0.3) for d in spacing_zyx]
    sig_hi = [TRABECULAR_SIGMAS_MM[1] / d for d in spacing_zyx]
    white = rng.standard_normal((n_z, y1 - y0, x1 - x0)).astype(np.float32)
    band = ndimage.gaussian_filter(white, sig_lo) - ndimage.gaussian_filter(white, sig_hi)
    band64 = np.tanh(1.3 * band.astype(np.float64) / max(float(band.std(dtype=np.float64)), 1e-6))
    band = (band64 / max(float(band64.std()), 1e-6)).astype(np.float32)
    return y0, y1, x0, x1, band


def _slice_mask(occupancy: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """The lesion mask on the slice grid: voxels at least half covered by the fine-grid lesion
    (``shape``: slices, sub-slices, rows, columns); a lesion thinner than half a slice keeps its
    most covered voxel."""
    manual = occupancy.reshape(shape).mean(axis=1) >= 0.5
    if not manual.any():
        occ = occupancy.reshape(shape).mean(axis=1)
        manual = occ == occ.max()
    return manual


def _scan(hu: np.ndarray, p: CaseParams, rng: np.random.Generator, shape: tuple[int, int, int, int],
          spacing_yx: tuple[float, float]) -> np.ndarray:
    """The CT (int16 HU) the scanner makes of the fine-grid ``hu``: slice profile (the sub-slices
    averaged, ``shape`` as in :func:`_slice_mask`), in-plane PSF, correlated noise drawn from
    ``rng``, the protocol's HU offset, clipped to :data:`HU_CLIP`."""
    sy, sx = spacing_yx
    image = hu.reshape(shape).mean(axis=1, dtype=np.float64)
    psf = p.blur_sd_mm
    image = ndimage.gaussian_filter(image, (0.0, psf / sy, psf / sx), mode="nearest")
    noise = _unit_field(rng, image.shape, (0.0, 0.5, 0.5))
    image = image + p.noise_sd_hu * noise + p.hu_offset
    return np.clip(np.rint(image), *HU_CLIP).astype(np.int16)


def render_case(p: CaseParams, rng: np.random.Generator) -> RenderedCase:
    """Render case ``p`` with the random fields drawn from ``rng`` (its render stream)."""
    sx, sy, sz = p.spacing_mm
    nx = ny = int(round(FOV_XY_MM / sx))
    nz = int(round(FOV_Z_MM / sz))
    n_sub = max(1, math.ceil(sz / MAX_SUBSLICE_MM - 1e-9))
    dz = sz / n_sub
    s = p.anatomy_scale

    # Image-frame coordinates (mm, centred), then the anatomy frame (rotate, shift).
    xi = (np.arange(nx, dtype=np.float64) - (nx - 1) / 2) * sx
    yi = (np.arange(ny, dtype=np.float64) - (ny - 1) / 2) * sy
    zc = (np.arange(nz, dtype=np.float64) - (nz - 1) / 2) * sz
    zf = (zc[:, None] + (np.arange(n_sub) + 0.5) * dz - sz / 2).reshape(-1)
    theta = math.radians(p.rotation_deg)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    X, Y = np.meshgrid(xi - p.shift_mm[0], yi - p.shift_mm[1], indexing="xy")
    xa = cos_t * X + sin_t * Y
    ya = -sin_t * X + cos_t * Y

    # --- in-plane soft tissue (2D, extruded along z) ---
    tissue = _soft_tissue(xa, ya, s, p.gas_side)

    # vertebral body cross-section, disc outline, canal
    bw, ba, bp, byc = (
        BODY_HALF_WIDTH * s,
        BODY_HALF_DEPTH_ANT * s,
        BODY_HALF_DEPTH_POST * s,
        BODY_CENTRE_Y * s,
    )
    rho_xy, q_xy = _superellipse(xa, ya, 0.0, byc, bw, ba, bp, p=2.4)
    disc_hu = np.where(rho_xy < -6 * s, DISC_NUCLEUS_HU, DISC_ANNULUS_HU).astype(np.float32)
    tissue = np.where(rho_xy <= 0.5, disc_hu, tissue)
    canal_y = byc + bp + 1.0 * s + 7.5 * s
    tissue[_superellipse(xa, ya, 0.0, canal_y, 10 * s, 7.5 * s)[0] <= 0] = CANAL_HU

    # posterior elements (2D parts; z-extent per vertebra below)
    posterior_parts = _posterior_elements(xa, ya, s, canal_y)

    # --- 3D bone at the fine z resolution ---
    hu = np.broadcast_to(tissue, (len(zf), ny, nx)).copy()
    rho_body, rho_body0, rho_post = _vertebra_distances(zf, rho_xy, q_xy, posterior_parts, s)

    # trabecular texture on the bodies' bounding box
    bone = rho_body <= 0
    trab = np.full(hu.shape, p.trabecular_mean_hu, dtype=np.float32)
    y0, y1, x0, x1, band = _trabecular_band(rng, rho_xy, len(zf), (dz, sy, sx))
    trab[:, y0:y1, x0:x1] += p.trabecular_texture_sd_hu * band
    hu = np.where(bone, np.where(rho_body > -CORTEX_MM, p.cortical_hu, trab), hu)
    post = rho_post <= 0
    post_interior = p.trabecular_mean_hu + POSTERIOR_INTERIOR_EXTRA_HU
    hu = np.where(post, np.where(rho_post > -POSTERIOR_CORTEX_MM, 0.9 * p.cortical_hu, post_interior), hu)

    # --- lesion in the middle body ---
    occupancy, lesion_info = _paint_lesion(
        p, rng, hu, xa, ya, zf, n_sub, (dz, sy, sx), rho_body0, s, byc, bw, ba, bp
    )

    # --- scanner: slice profile, PSF, noise, offset ---
    manual = _slice_mask(occupancy, (nz, n_sub, ny, nx))
    image = _scan(hu, p, rng, (nz, n_sub, ny, nx), (sy, sx))

    inside_body = (rho_body0.reshape(nz, n_sub, ny, nx).min(axis=1)) <= 0
    annotator = _annotator_mask(manual, rng, (sz, sy, sx)) & inside_body
    if not annotator.any():
        annotator = manual.copy()

    origin = (float(-(nx - 1) / 2 * sx), float(-(ny - 1) / 2 * sy), float(p.origin_z_mm))
    lesion_vox = manual[manual]
    summary = {
        **lesion_info,
        "size_voxels": [nx, ny, nz],
        "lesion_volume_ml": volume_ml(lesion_vox.size, (sx, sy, sz)),
        "annotator_volume_ml": volume_ml(int(annotator.sum()), (sx, sy, sz)),
        "dice_annotator": float(2 * (manual & annotator).sum() / (manual.sum() + annotator.sum())),
    }
    return RenderedCase(image, manual, annotator, (sx, sy, sz), origin, summary)


def _posterior_elements(xa, ya, s, canal_y) -> list[tuple[np.ndarray, float, float]]:
    """The posterior arch as ``(in-plane signed distance mm, z centre mm, z half-extent mm)`` parts.

    z is relative to the vertebral body's centre: pedicles and transverse processes sit at
    its upper half, the spinous process lower; the articular pillars span the whole level.
    """
    pedicles = np.minimum(
        _superellipse(xa, ya, -14 * s, canal_y - 2 * s, 3.5 * s, 7 * s, p=4)[0],
        _superellipse(xa, ya, 14 * s, canal_y - 2 * s, 3.5 * s, 7 * s, p=4)[0],
    )
    facets = np.minimum(
        _superellipse(xa, ya, -16 * s, canal_y + 8 * s, 4.5 * s, 4.5 * s)[0],
        _superellipse(xa, ya, 16 * s, canal_y + 8 * s, 4.5 * s, 4.5 * s)[0],
    )
    outer = _superellipse(xa, ya, 0.0, canal_y, 17 * s, 13 * s)[0]
    inner = _superellipse(xa, ya, 0.0, canal_y, 11.5 * s, 8.5 * s)[0]
    lamina = np.maximum(np.maximum(outer, -inner), canal_y + 2 * s - ya)
    spinous = _superellipse(xa, ya, 0.0, canal_y + 20 * s, 3 * s, 12 * s, p=4)[0]
    transverse = np.minimum(
        _superellipse(xa, ya, -27 * s, canal_y - 3 * s, 12 * s, 3.5 * s, p=3)[0],
        _superellipse(xa, ya, 27 * s, canal_y - 3 * s, 12 * s, 3.5 * s, p=3)[0],
    )
    return [
        (pedicles, 3 * s, 8 * s),
        (facets, 0.0, 13 * s),
        (lamina, -1 * s, 11 * s),
        (spinous, -5 * s, 8 * s),
        (transverse, 3 * s, 4.5 * s),
    ]


def _paint_lesion(p, rng, hu, xa, ya, zf, n_sub, fine_spacing, rho_body0, s, byc, bw, ba, bp):
    """Paint the lesion into ``hu`` (fine grid) and return its occupancy (float32) and a summary."""
    r = p.radius_mm
    amp = irregularity_amplitude(p.irregularity)
    lobes = _Lobes(rng)
    # nominal centre in the anatomy frame, kept inside the trabecular compartment
    in_w, in_a, in_p = bw - CORTEX_MM, ba - CORTEX_MM, bp - CORTEX_MM
    in_h = BODY_HALF_HEIGHT * s * (1 - ENDPLATE_CONCAVITY) - CORTEX_MM
    ox, oy, oz = p.lesion_offset
    elongation = math.exp(ELONGATION_PER_AMPLITUDE * amp)
    axes = (elongation, 1.0, 1.0 / elongation)  # semi-axes / r along the lesion's own axes (x, y, z)
    room = lambda half, axis: max(0.0, half - r * axes[axis] - LESION_MARGIN_MM)  # noqa: E731
    cx = ox * room(in_w, 0) * 0.7
    cy = byc + (oy * room(in_a, 1) if oy < 0 else oy * room(in_p, 1)) * 0.7
    cz = oz * room(in_h, 2)
    # bounding box on the fine grid (image frame coordinates of the anatomy-frame centre)
    theta = math.radians(p.rotation_deg)
    cxi = math.cos(theta) * cx - math.sin(theta) * cy + p.shift_mm[0]
    cyi = math.sin(theta) * cx + math.cos(theta) * cy + p.shift_mm[1]
    dz, sy, sx = fine_spacing
    ny, nx = xa.shape
    lobe_amp = LOBE_FRACTION * amp
    reach = r * elongation * (1 + 2.5 * lobe_amp) + 2.0
    ix0 = max(0, int((cxi - reach) / sx + (nx - 1) / 2))
    ix1 = min(nx, int((cxi + reach) / sx + (nx - 1) / 2) + 2)
    iy0 = max(0, int((cyi - reach) / sy + (ny - 1) / 2))
    iy1 = min(ny, int((cyi + reach) / sy + (ny - 1) / 2) + 2)
    iz = np.nonzero(np.abs(zf - cz) <= reach)[0]
    iz0, iz1 = int(iz.min()), int(iz.max()) + 1
    box = (slice(iz0, iz1), slice(iy0, iy1), slice(ix0, ix1))
    bx = xa[box[1:]][None] - cx
    by = ya[box[1:]][None] - cy
    bz = (zf[iz0:iz1] - cz)[:, None, None]
    bx, by, bz = np.broadcast_arrays(bx, by, bz)
    # lesion frame: the anatomy-frame offsets along the lesion's axes (element-wise float64, no BLAS)
    rot = _orientation(rng)
    local = [bx * rot[0, j] + by * rot[1, j] + bz * rot[2, j] for j in range(3)]
    dist = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
    u = np.stack(local, axis=-1).reshape(-1, 3) / np.maximum(dist.reshape(-1, 1), 1e-6)
    # ellipsoidal radius: the offset in units of the ellipsoid's semi-axes
    scaled = np.sqrt(sum((local[j] / axes[j]) ** 2 for j in range(3)))
    lobe = np.clip(lobes(u).reshape(dist.shape), -2.5, 2.5)
    boundary = r * np.maximum(1.0 + lobe_amp * lobe, 0.4)
    inside = (scaled <= boundary) & (rho_body0[box] <= -(CORTEX_MM + LESION_RIM_MM))
    mean = lesion_mean_hu(p.density, p.trabecular_mean_hu)
    tex_sd = lesion_texture_sd_hu(p.heterogeneity)
    # the texture lives on the output slices (constant within a slice's sub-slices) so that the
    # slice profile does not wash it out: its sd stays a direct image of the heterogeneity latent
    k0, k1 = iz0 // n_sub, (iz1 - 1) // n_sub + 1
    slice_mm = dz * n_sub
    sigma = [
        max(LESION_TEXTURE_SIGMA_MM / slice_mm, 0.5),
        LESION_TEXTURE_SIGMA_MM / sy,
        LESION_TEXTURE_SIGMA_MM / sx,
    ]
    coarse = _unit_field(rng, (k1 - k0, dist.shape[1], dist.shape[2]), sigma)
    texture = np.repeat(coarse, n_sub, axis=0)[iz0 - k0 * n_sub : iz1 - k0 * n_sub]
    values = mean + tex_sd * texture
    bone_mean = p.trabecular_mean_hu
    # Texture reaching past the limit is reflected back (not clipped), so that its spread keeps
    # growing with the heterogeneity latent.
    if p.density < 0:
        limit = bone_mean - LYTIC_MAX_BELOW_BONE_HU
        values = np.where(values > limit, 2 * limit - values, values)
    else:
        limit = bone_mean + BLASTIC_MIN_ABOVE_BONE_HU
        values = np.where(values < limit, 2 * limit - values, values)
    region = hu[box]
    region[inside] = values[inside]
    occupancy = np.zeros(hu.shape, dtype=np.float32)
    occupancy[box] = inside
    info = {
        "lesion_centre_mm": [float(cx), float(cy), float(cz)],
        "lesion_mean_hu": float(mean),
        "lesion_texture_sd_hu": float(tex_sd),
        "irregularity_amplitude": float(amp),
        "elongation": float(elongation),
    }
    return occupancy, info


def _orientation(rng: np.random.Generator) -> np.ndarray:
    """Rotation matrix (columns: the lesion's axes in the anatomy frame) near the identity."""
    ax, ay, az = np.radians(rng.normal(0.0, LESION_ORIENTATION_SD_DEG, size=3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _annotator_mask(manual: np.ndarray, rng: np.random.Generator, spacing_zyx) -> np.ndarray:
    """Move the manual boundary by a smooth random field (mm) plus a global bias.

    The field's sd is ``ANNOTATOR_FIELD_SD_MM`` but at least ``ANNOTATOR_MIN_VOXELS`` of the
    finest spacing: readers disagree by about a voxel whatever the resolution.
    """
    pad = 4
    zz, yy, xx = np.nonzero(manual)
    lo = [max(0, int(a.min()) - pad) for a in (zz, yy, xx)]
    hi = [min(n, int(a.max()) + pad + 1) for a, n in zip((zz, yy, xx), manual.shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    m = manual[box]
    half = 0.5 * min(spacing_zyx)
    # signed distance (mm) to the boundary, which lies about half a voxel beyond the outermost voxel centres
    d_out = ndimage.distance_transform_edt(~m, sampling=spacing_zyx)
    d_in = ndimage.distance_transform_edt(m, sampling=spacing_zyx)
    sdf = np.where(m, half - d_in, d_out - half)
    sd = max(ANNOTATOR_FIELD_SD_MM, ANNOTATOR_MIN_VOXELS * min(spacing_zyx))
    field = _unit_field(rng, m.shape, [ANNOTATOR_FIELD_SIGMA_MM / d for d in spacing_zyx])
    shift = sd * field + ANNOTATOR_BIAS_SD_MM * rng.standard_normal()
    out = np.zeros_like(manual)
    out[box] = sdf <= shift
    return out
