"""The latent generative model of the synthetic cohort: label -> lesion phenotype latents.

Each case draws three phenotype latents that depend on the label (1 = breast origin,
0 = other origin) only through overlapping Gaussian distributions with a shared covariance:

    z = (density, heterogeneity, irregularity) | label ~ N(mu_label, Sigma)

* ``density``: < 0 osteolytic (lesion darker than trabecular bone), > 0 osteoblastic (brighter);
  the magnitude sets the lesion's mean HU (an absolute value, kept clear of the bone's).
* ``heterogeneity``: log-scale of the lesion's internal HU texture (mixed lesions are high).
* ``irregularity``: margin irregularity: how elongated and lobulated the lesion's boundary is.

Lesion size, position and every scanner or anatomy variable are independent of the label.
Because the class-conditional distributions are Gaussian with a shared covariance, the
posterior log-likelihood ratio (LLR) is linear in z and the Bayes-optimal AUC (the ceiling any
classifier can reach, even one that sees the latents) is exactly ``Phi(Delta / sqrt(2))`` with
``Delta`` the Mahalanobis distance between the class means.

Every case's random variables come from its own NumPy stream seeded by ``(seed, case index)``,
so a case never depends on the others (labels come from one cohort-level permutation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from bonemet.errors import UserError

LATENT_NAMES: tuple[str, ...] = ("density", "heterogeneity", "irregularity")

# Class means and shared covariance of the phenotype latents (unitless, standardised).
# A shift of 1.05 sd per latent gives a Mahalanobis distance of 1.82 and a Bayes AUC of 0.90,
# while each latent alone reaches only about 0.77: no single feature separates the classes.
MEAN_LABEL0: tuple[float, ...] = (0.525, -0.525, -0.525)
MEAN_LABEL1: tuple[float, ...] = (-0.525, 0.525, 0.525)
COVARIANCE: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

# Label-independent variables (ranges, mm unless stated).
RADIUS_MM = (5.0, 11.5)  # nominal lesion radius before the boundary perturbation
ANATOMY_SCALE = (0.9, 1.1)  # isotropic scale of the vertebra and surroundings
FULL_INPLANE_SPACING_MM = (0.6, 1.0)
FULL_SLICE_THICKNESS_MM = (1.0, 3.0)
SMALL_INPLANE_SPACING_MM = (2.4, 2.7)
SMALL_SLICE_THICKNESS_MM = (2.0, 2.3)
NOISE_SD_HU = (8.0, 25.0)
BLUR_SD_MM = (0.35, 0.8)  # in-plane point-spread function sd
HU_OFFSET_SD = 6.0
TRABECULAR_MEAN_HU = (190.0, 290.0)
TRABECULAR_TEXTURE_SD_HU = (45.0, 70.0)
CORTICAL_HU = (1000.0, 1500.0)

# Stream tags of the per-purpose NumPy seed sequences.
_STREAM_LABELS = 1
_STREAM_CASE = 2
_STREAM_RENDER = 3


class SyntheticParamsError(UserError, ValueError):
    """Invalid arguments to the synthetic cohort generator (names the argument and value)."""


@dataclass(frozen=True)
class CaseParams:
    """Every random variable of one synthetic case (drawn before any image is rendered).

    Latents are unitless; lengths in mm; intensities in HU; angles in degrees.
    """

    case_id: str
    index: int
    label: int
    density: float
    heterogeneity: float
    irregularity: float
    llr: float
    radius_mm: float
    lesion_offset: tuple[float, float, float]  # lesion centre in units of its allowed range, each in [-1, 1]
    anatomy_scale: float
    rotation_deg: float
    shift_mm: tuple[float, float]
    spacing_mm: tuple[float, float, float]  # (x, y, z) as SimpleITK orders it
    noise_sd_hu: float
    blur_sd_mm: float
    hu_offset: float
    trabecular_mean_hu: float
    trabecular_texture_sd_hu: float
    cortical_hu: float
    gas_side: int  # -1 or +1: side of the bowel-gas pocket
    origin_z_mm: float

    def latents(self) -> dict[str, float]:
        """The phenotype latents by name."""
        return {name: getattr(self, name) for name in LATENT_NAMES}

    def as_dict(self) -> dict:
        """JSON-friendly dict (tuples become lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


def _moments() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.asarray(MEAN_LABEL0), np.asarray(MEAN_LABEL1), np.asarray(COVARIANCE)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def mahalanobis_distance() -> float:
    """Mahalanobis distance between the class means of the latents."""
    mu0, mu1, cov = _moments()
    diff = mu1 - mu0
    return float(np.sqrt(diff @ np.linalg.solve(cov, diff)))


def bayes_auc() -> float:
    """Exact Bayes-optimal AUC of the latent model: ``Phi(Delta / sqrt 2)``.

    With a shared covariance the LLR is ``w . z + b`` with ``w = Sigma^-1 (mu1 - mu0)``; it is
    Gaussian in each class with means differing by ``Delta^2`` and variance ``Delta^2``, so
    ``P(LLR_1 > LLR_0) = Phi(Delta / sqrt 2)``.
    """
    return _normal_cdf(mahalanobis_distance() / math.sqrt(2.0))


def single_latent_auc() -> dict[str, float]:
    """Exact AUC of each latent used alone (oriented towards label 1)."""
    mu0, mu1, cov = _moments()
    return {
        name: _normal_cdf(abs(mu1[i] - mu0[i]) / math.sqrt(2.0 * cov[i, i]))
        for i, name in enumerate(LATENT_NAMES)
    }


def llr(latents: np.ndarray) -> np.ndarray:
    """Posterior log-likelihood ratio log p(z|1)/p(z|0) for latents of shape (n, 3)."""
    mu0, mu1, cov = _moments()
    w = np.linalg.solve(cov, mu1 - mu0)
    b = -0.5 * (mu1 @ np.linalg.solve(cov, mu1) - mu0 @ np.linalg.solve(cov, mu0))
    return np.asarray(latents, dtype=float) @ w + b


def empirical_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC of ``scores`` for ``labels`` (Mann-Whitney, ties counted half)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        raise SyntheticParamsError(
            f"AUC needs both classes; found {len(pos)} positive and {len(neg)} negative"
        )
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), dtype=float)
    ranks[order] = np.arange(1, len(order) + 1)
    # average ranks over ties
    values = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def check_counts(n_cases: int, n_positive: int) -> None:
    """Raise SyntheticParamsError unless 1 <= n_positive < n_cases."""
    if int(n_cases) != n_cases or n_cases < 2:
        raise SyntheticParamsError(f"n_cases must be an integer >= 2; found {n_cases}")
    if int(n_positive) != n_positive or not 1 <= n_positive < n_cases:
        raise SyntheticParamsError(
            f"n_positive must be an integer in [1, n_cases - 1] = [1, {n_cases - 1}]; found {n_positive}"
        )


def case_labels(n_cases: int, n_positive: int, seed: int) -> np.ndarray:
    """Labels of the cohort: exactly ``n_positive`` ones, at seeded random positions."""
    check_counts(n_cases, n_positive)
    labels = np.zeros(n_cases, dtype=np.int64)
    labels[:n_positive] = 1
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM_LABELS, n_cases, n_positive]))
    return rng.permutation(labels)


def case_id(index: int) -> str:
    """Case id for a 0-based index: ``case_000``."""
    return f"case_{index:03d}"


def sample_case_params(seed: int, index: int, label: int, *, size: str) -> CaseParams:
    """Draw every random variable of case ``index`` from its own stream ``(seed, index)``.

    ``size`` only changes the voxel spacing ("small": coarse spacing for tests); the latents
    and everything else are the same for both sizes.
    """
    if size not in ("full", "small"):
        raise SyntheticParamsError(f"size must be 'full' or 'small'; found {size!r}")
    if label not in (0, 1):
        raise SyntheticParamsError(f"label must be 0 or 1; found {label!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM_CASE, int(index)]))
    mu0, mu1, cov = _moments()
    z = rng.multivariate_normal(mu1 if label == 1 else mu0, cov, method="cholesky")
    radius = rng.uniform(*RADIUS_MM)
    offset = tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=3))
    scale = rng.uniform(*ANATOMY_SCALE)
    rotation = rng.normal(0.0, 4.0)
    shift = tuple(float(v) for v in rng.normal(0.0, 2.0, size=2))
    inplane_full = rng.uniform(*FULL_INPLANE_SPACING_MM)
    thick_full = rng.uniform(*FULL_SLICE_THICKNESS_MM)
    inplane_small = rng.uniform(*SMALL_INPLANE_SPACING_MM)
    thick_small = rng.uniform(*SMALL_SLICE_THICKNESS_MM)
    inplane, thick = (inplane_full, thick_full) if size == "full" else (inplane_small, thick_small)
    return CaseParams(
        case_id=case_id(index),
        index=int(index),
        label=int(label),
        density=float(z[0]),
        heterogeneity=float(z[1]),
        irregularity=float(z[2]),
        llr=float(llr(z[None, :])[0]),
        radius_mm=float(radius),
        lesion_offset=offset,
        anatomy_scale=float(scale),
        rotation_deg=float(rotation),
        shift_mm=shift,
        spacing_mm=(round(float(inplane), 4), round(float(inplane), 4), round(float(thick), 4)),
        noise_sd_hu=float(rng.uniform(*NOISE_SD_HU)),
        blur_sd_mm=float(rng.uniform(*BLUR_SD_MM)),
        hu_offset=float(rng.normal(0.0, HU_OFFSET_SD)),
        trabecular_mean_hu=float(rng.uniform(*TRABECULAR_MEAN_HU)),
        trabecular_texture_sd_hu=float(rng.uniform(*TRABECULAR_TEXTURE_SD_HU)),
        cortical_hu=float(rng.uniform(*CORTICAL_HU)),
        gas_side=int(rng.choice([-1, 1])),
        origin_z_mm=float(np.round(rng.uniform(-600.0, -200.0), 1)),
    )


def render_rng(seed: int, index: int) -> np.random.Generator:
    """The stream used to render case ``index``'s random fields (textures, noise, annotator)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM_RENDER, int(index)]))


def sample_latents(n_cases: int, n_positive: int, seed: int, *, size: str) -> list[CaseParams]:
    """The parameters (latents included) of every case of a cohort, without rendering images.

    Identical to what :func:`bonemet.data.synthetic.generate_cohort` records in cohort.json
    for the same arguments, so statistical properties can be tested on many cases cheaply.
    """
    labels = case_labels(n_cases, n_positive, seed)
    return [sample_case_params(seed, i, int(labels[i]), size=size) for i in range(n_cases)]
