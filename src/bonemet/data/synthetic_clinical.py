"""A clinical-size CT made from a synthetic case: for timing prediction on a realistic matrix.

The synthetic cohort's CTs cover about 80 x 80 x 60 mm around one lumbar vertebra. A clinical
abdominal CT is a 512 x 512 matrix of about 0.8 mm over the whole body, with a few hundred
slices. :func:`clinical_ct` builds one from a synthetic case: the case is resampled to the
clinical spacing and repeated along z (a longer spine, one lesion per copy), and placed in the
posterior part of a body (an ellipse of fat with a muscle wall and noise) surrounded by air,
with ribs in the upper slices (arcs around the body, every ``RIB_PITCH_MM``) and iliac wings
in the lower slices, so that the bone a crop finds spans the body as in an abdominal CT.

The lesion mask is the middle copy's lesion (the case's own, once; the other copies' lesions
are in the image but not in the mask), on the clinical CT's grid. The result is meant for speed
measurements and plumbing tests (sizes, reading, cropping, sliding windows, mapping back).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from bonemet.data.io import resampled_grid

AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 45.0
NOISE_SD_HU = 12.0
#: body ellipse semi-axes as fractions of the in-plane field of view (x: left-right, y: front-back)
BODY_SEMI_AXES = (0.42, 0.30)
MUSCLE_WALL_MM = 12.0
#: the spine's centre behind the body's centre, as a fraction of the y semi-axis
SPINE_POSTERIOR_SHIFT = 0.45
CORTICAL_HU = 900.0
TRABECULAR_HU = 250.0
#: ribs: in the upper RIB_FRACTION of the slices, one every RIB_PITCH_MM along z, RIB_MM thick,
#: on the ellipse at RIB_RHO of the body's, over the back and sides (angles from the +x axis,
#: degrees, y pointing to the back)
RIB_FRACTION = 0.35
RIB_PITCH_MM = 28.0
RIB_MM = 8.0
RIB_RHO = 0.86
RIB_ARC_DEG = (-20.0, 200.0)
#: iliac wings: in the lower PELVIS_FRACTION of the slices, two plates beside the spine
PELVIS_FRACTION = 0.3


def clinical_ct(
    image_hu: sitk.Image,
    mask: sitk.Image,
    *,
    size: Sequence[int],
    spacing_mm: Sequence[float],
    seed: int,
) -> tuple[sitk.Image, sitk.Image]:
    """A clinical-size CT (int16 HU) and its lesion mask (uint8 0/1) from a synthetic case.

    Args:
        image_hu: a synthetic case's CT (HU; identity direction, as the generator writes it).
        mask: its binary lesion mask on the same grid.
        size: (x, y, z) voxels of the result, e.g. (512, 512, 200).
        spacing_mm: (x, y, z) voxel size of the result in mm, e.g. (0.8, 0.8, 1.5).
        seed: seeds the body's noise.

    Raises:
        ValueError: a size or spacing that is not three positive numbers, or a field of view
            too small to hold the case in-plane.
    """
    size = tuple(int(v) for v in size)
    spacing = tuple(float(v) for v in spacing_mm)
    if len(size) != 3 or len(spacing) != 3 or min(size) < 1 or min(spacing) <= 0:
        raise ValueError(f"size and spacing_mm must be three positive values (x, y, z); found {size}, {spacing}")
    # the case on the clinical spacing, over its own extent
    reference = resampled_grid(image_hu, spacing)
    block = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(image_hu, sitk.sitkFloat32), reference, sitk.Transform(),
                                                 sitk.sitkLinear, FAT_HU, sitk.sitkFloat32))
    block_mask = sitk.GetArrayFromImage(sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                      0, sitk.sitkUInt8))
    nx, ny, nz = size
    bz, by, bx = block.shape
    if bx > nx or by > ny:
        raise ValueError(f"the case ({bx} x {by} voxels in-plane at {spacing[:2]} mm) does not fit a {nx} x {ny} "
                         "matrix: use a larger size")

    rng = np.random.default_rng(seed)
    # body: fat ellipse with a muscle wall, in-plane (extruded along z), air outside
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    ax, ay = BODY_SEMI_AXES[0] * nx, BODY_SEMI_AXES[1] * ny
    rho = np.hypot((xx - cx) / ax, (yy - cy) / ay)
    wall = MUSCLE_WALL_MM / spacing[0] / min(ax, ay)
    plane = np.full((ny, nx), AIR_HU, np.float32)
    plane[rho <= 1.0] = MUSCLE_HU
    plane[rho <= 1.0 - wall] = FAT_HU
    volume = np.broadcast_to(plane, (nz, ny, nx)).copy()
    volume += rng.normal(0.0, NOISE_SD_HU, volume.shape).astype(np.float32) * (plane > AIR_HU)
    lesion = np.zeros((nz, ny, nx), np.uint8)

    _add_ribs_and_pelvis(volume, spacing, (cx, cy), (ax, ay))

    # the spine: the case repeated along z, centred in x, behind the body's centre in y
    x0 = int(round(cx - bx / 2))
    y0 = int(round(cy + SPINE_POSTERIOR_SHIFT * ay - by / 2))
    y0 = min(max(y0, 0), ny - by)
    copies = int(np.ceil(nz / bz))
    z_start = (nz - copies * bz) // 2  # centred: the middle copy is whole
    middle = copies // 2
    for k in range(copies):
        lo, hi = z_start + k * bz, z_start + (k + 1) * bz
        clo, chi = max(lo, 0), min(hi, nz)
        if chi <= clo:
            continue
        src = slice(clo - lo, chi - lo)
        volume[clo:chi, y0:y0 + by, x0:x0 + bx] = block[src]
        if k == middle:
            lesion[clo:chi, y0:y0 + by, x0:x0 + bx] = block_mask[src]

    origin = (-(nx - 1) / 2 * spacing[0], -(ny - 1) / 2 * spacing[1], -(nz - 1) / 2 * spacing[2])
    out = sitk.GetImageFromArray(np.clip(np.rint(volume), -1024, 3071).astype(np.int16))
    out_mask = sitk.GetImageFromArray(lesion)
    for img in (out, out_mask):
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
    return out, out_mask


def _add_ribs_and_pelvis(volume: np.ndarray, spacing: Sequence[float], centre: tuple[float, float],
                         semi_axes: tuple[float, float]) -> None:
    """Paint ribs (upper slices) and iliac wings (lower slices) into ``volume`` (z, y, x), HU."""
    nz, ny, nx = volume.shape
    sx, sy, sz = spacing
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    dx, dy = (xx - centre[0]) * sx, (yy - centre[1]) * sy  # mm; +y is the back
    ax_mm, ay_mm = semi_axes[0] * sx, semi_axes[1] * sy
    # ribs: a band around the ellipse at RIB_RHO, on the back and sides
    rho_mm = np.hypot(dx / ax_mm, dy / ay_mm) * min(ax_mm, ay_mm)
    angle = np.degrees(np.arctan2(dy, dx))
    on_arc = (angle >= RIB_ARC_DEG[0]) & (angle <= RIB_ARC_DEG[1])
    band = np.abs(rho_mm - RIB_RHO * min(ax_mm, ay_mm)) <= RIB_MM / 2
    rib_plane = on_arc & band
    rib_core = on_arc & (np.abs(rho_mm - RIB_RHO * min(ax_mm, ay_mm)) <= RIB_MM / 2 - 1.5)
    z_mm = (np.arange(nz) - (nz - 1) / 2) * sz
    top = z_mm.max() - RIB_FRACTION * (z_mm.max() - z_mm.min())
    for k, z in enumerate(z_mm):
        if z >= top and abs(((z - top) % RIB_PITCH_MM) - RIB_PITCH_MM / 2) <= RIB_MM / 2:
            volume[k][rib_plane] = CORTICAL_HU
            volume[k][rib_core] = TRABECULAR_HU
    # iliac wings: two tilted elliptical plates left and right of the spine, lower slices
    bottom = z_mm.min() + PELVIS_FRACTION * (z_mm.max() - z_mm.min())
    for side in (-1.0, 1.0):
        ux, uy = dx - side * 0.55 * ax_mm, dy - 0.25 * ay_mm
        tilt = np.radians(side * 35.0)
        along = np.cos(tilt) * ux + np.sin(tilt) * uy
        across = -np.sin(tilt) * ux + np.cos(tilt) * uy
        plate = (along / (0.28 * ax_mm)) ** 2 + (across / 9.0) ** 2 <= 1.0
        core = (along / (0.28 * ax_mm - 2.0)) ** 2 + (across / 6.0) ** 2 <= 1.0
        for k in np.flatnonzero(z_mm <= bottom):
            volume[k][plate] = CORTICAL_HU
            volume[k][core] = TRABECULAR_HU
