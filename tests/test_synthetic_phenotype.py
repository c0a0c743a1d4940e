"""The synthetic lesion phenotype: each latent reaches the image in the way the radiomic features can see.

Renders single full-size cases with one latent changed at a time (same random streams), so that
every difference is the latent's doing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from bonemet.data import synthetic_phantom as phantom
from bonemet.data.synthetic_latents import render_rng, sample_case_params

SEED = 99
INDEX = 5


def _case(**changes):
    """A full-size case with a central mid-size lesion and a quiet scanner, plus ``changes``."""
    base = sample_case_params(SEED, INDEX, label=1, size="full")
    quiet = dict(radius_mm=7.0, lesion_offset=(0.0, 0.0, 0.0), noise_sd_hu=8.0, blur_sd_mm=0.35, hu_offset=0.0)
    return dataclasses.replace(base, **{**quiet, **changes})


def _render(params):
    return phantom.render_case(params, render_rng(SEED, INDEX))


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by one slice and two voxels in-plane (no partial volume with the bone)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    inplane = ndimage.binary_erosion(mask, structure, iterations=2)
    return ndimage.binary_erosion(inplane, np.ones((3, 1, 1), dtype=bool))


def _flatness(mask: np.ndarray, spacing_xyz) -> float:
    """sqrt(smallest / largest eigenvalue) of the voxel coordinates' covariance (PyRadiomics' Flatness)."""
    coords = np.argwhere(mask) * np.asarray(spacing_xyz[::-1])
    eig = np.linalg.eigvalsh(np.cov(coords.T))
    return float(np.sqrt(eig[0] / eig[-1]))


def test_lytic_mean_is_absolute_and_both_kinds_stay_apart_from_the_bone():
    # a lytic lesion's mean HU does not follow the bone's density ...
    assert phantom.lesion_mean_hu(-0.5, 200.0) == phantom.lesion_mean_hu(-0.5, 280.0)
    # ... and is monotone in the latent on each side, never within the limits around the bone
    for bone in (190.0, 240.0, 290.0):
        lytic = [phantom.lesion_mean_hu(d, bone) for d in np.linspace(-3.0, -0.01, 30)]
        blastic = [phantom.lesion_mean_hu(d, bone) for d in np.linspace(0.0, 3.0, 30)]
        assert np.all(np.diff(lytic) >= 0) and np.all(np.diff(blastic) >= 0)
        assert max(lytic) <= bone - phantom.LYTIC_MAX_BELOW_BONE_HU
        assert min(blastic) >= bone + phantom.BLASTIC_MIN_ABOVE_BONE_HU
        assert np.ptp(lytic) > 150 and np.ptp(blastic) > 500


def test_heterogeneity_sets_the_lesion_texture():
    calm = _render(_case(density=1.0, heterogeneity=-1.5))
    mixed = _render(_case(density=1.0, heterogeneity=1.5))
    assert np.array_equal(calm.manual, mixed.manual)  # same lesion, only its texture differs
    inner = _interior(calm.manual)
    assert inner.sum() > 200
    sd_calm = calm.image[inner].std()
    sd_mixed = mixed.image[inner].std()
    assert sd_mixed > 3 * sd_calm
    assert calm.summary["lesion_texture_sd_hu"] < mixed.summary["lesion_texture_sd_hu"]


@pytest.mark.parametrize("density", [-0.2, 0.2])
def test_strong_texture_is_reflected_never_reaching_the_bone(density):
    params = _case(density=density, heterogeneity=2.5, noise_sd_hu=0.0)
    case = _render(params)
    inner = case.image[_interior(case.manual)].astype(float)
    bone = params.trabecular_mean_hu
    if density < 0:
        assert inner.max() <= bone - phantom.LYTIC_MAX_BELOW_BONE_HU + 1
    else:
        assert inner.min() >= bone + phantom.BLASTIC_MIN_ABOVE_BONE_HU - 1
    # reflected, not clipped: the spread stays large and few voxels sit at the limit
    limit = bone - phantom.LYTIC_MAX_BELOW_BONE_HU if density < 0 else bone + phantom.BLASTIC_MIN_ABOVE_BONE_HU
    assert inner.std() > 100
    assert np.mean(np.abs(inner - limit) <= 2) < 0.05


def test_irregularity_flattens_and_lobulates_the_lesion():
    smooth = _render(_case(irregularity=-2.0))
    irregular = _render(_case(irregularity=2.0))
    spacing = smooth.spacing
    assert _flatness(smooth.manual, spacing) > 0.8
    assert _flatness(irregular.manual, spacing) < 0.55
    assert irregular.summary["elongation"] > 1.5 > 1.1 > smooth.summary["elongation"]
    # volume is kept by the elongation: within 25 % of the smooth lesion's
    ratio = irregular.manual.sum() / smooth.manual.sum()
    assert 0.75 < ratio < 1.25
