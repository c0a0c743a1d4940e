"""The embedded synthetic spine-CT cohort, written in the bring-your-own format.

``generate_cohort(out_dir, ...)`` writes::

    out_dir/
      manifest.csv                 case_id,label,image,mask,annotator_mask,spacing_x_mm,spacing_y_mm,spacing_z_mm
      images/case_000.nii.gz       int16 HU
      masks/case_000.nii.gz        uint8 label map, lesion = mask_label
      annotator_masks/case_000.nii.gz   a second reader's mask (boundary moved by ~1 mm)
      cohort.json                  per-case latents and the cohort's Bayes-optimal AUC

The label (1 = breast origin, 0 = other origin) acts on the image only through the lesion's
phenotype latents (see :mod:`bonemet.data.synthetic_latents`); the anatomy and the scanner are
described in :mod:`bonemet.data.synthetic_phantom`. The same seed gives byte-identical files.

Sites. ``protocols`` (params ``data.synthetic.protocols``, the first ``data.synthetic.sites``
of them) describe each site's acquisition as data: case ``i`` is scanned with
``protocols[i % n_sites]``, so the site is independent of the label and of everything else
drawn for the case. A protocol scales the case's noise sd (``noise_scale``) and in-plane
point-spread sd (``blur_scale``; > 1 is a softer kernel), adds ``hu_offset`` HU, and maps the
slice thickness into ``slice_thickness_mm`` (the same quantile of the new range; null keeps
it). With more than one site the manifest gets a ``site`` column (the protocol names) and
cohort.json each case's site and the protocols. One site with the identity protocol (the
default) writes exactly the single-site cohort.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from bonemet.data.io import write_image
from bonemet.data.manifest import MANIFEST_NAME
from bonemet.data.synthetic_latents import (
    COVARIANCE,
    FULL_SLICE_THICKNESS_MM,
    LATENT_NAMES,
    MEAN_LABEL0,
    MEAN_LABEL1,
    SMALL_SLICE_THICKNESS_MM,
    CaseParams,
    SyntheticParamsError,
    bayes_auc,
    case_labels,
    check_counts,
    empirical_auc,
    mahalanobis_distance,
    render_rng,
    sample_case_params,
    sample_latents,
    single_latent_auc,
)
from bonemet.data.synthetic_phantom import RenderedCase, render_case
from bonemet.utils import json_rounded, progress, write_json

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import ProtocolSpec

__all__ = [
    "LATENT_NAMES",
    "CohortExistsError",
    "SyntheticParamsError",
    "apply_protocol",
    "bayes_auc",
    "generate_cohort",
    "plot_cases",
    "sample_latents",
    "single_latent_auc",
]

log = logging.getLogger(__name__)

COHORT_JSON = "cohort.json"
MANIFEST_COLUMNS = (
    "case_id",
    "label",
    "image",
    "mask",
    "annotator_mask",
    "spacing_x_mm",
    "spacing_y_mm",
    "spacing_z_mm",
)


SITE_COLUMN = "site"


class CohortExistsError(SyntheticParamsError):
    """The output folder already holds files and overwriting was not asked for."""


def apply_protocol(params: CaseParams, protocol: ProtocolSpec, *, size: str) -> CaseParams:
    """``params`` as scanned with ``protocol`` (noise and blur scaled, HU offset added, slice
    thickness mapped into the protocol's range at the same quantile of the size's own range)."""
    sx, sy, sz = params.spacing_mm
    if protocol.slice_thickness_mm is not None:
        lo0, hi0 = FULL_SLICE_THICKNESS_MM if size == "full" else SMALL_SLICE_THICKNESS_MM
        lo, hi = protocol.slice_thickness_mm
        quantile = min(1.0, max(0.0, (sz - lo0) / (hi0 - lo0)))
        sz = round(float(lo + quantile * (hi - lo)), 4)
    return dataclasses.replace(
        params,
        noise_sd_hu=params.noise_sd_hu * float(protocol.noise_scale),
        blur_sd_mm=params.blur_sd_mm * float(protocol.blur_scale),
        hu_offset=params.hu_offset + float(protocol.hu_offset),
        spacing_mm=(sx, sy, sz),
    )


def _to_image(array: np.ndarray, spacing, origin, pixel_type: int) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image = sitk.Cast(image, pixel_type)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    return image


def generate_cohort(
    out_dir: str | Path,
    *,
    n_cases: int,
    n_positive: int,
    seed: int,
    size: str,
    mask_label: int,
    protocols: Sequence[ProtocolSpec] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic cohort to ``out_dir`` and return its summary (cohort.json minus the cases).

    Args:
        out_dir: output folder; created if missing. Must be empty unless ``overwrite``.
        n_cases: number of cases.
        n_positive: number of label-1 (breast origin) cases.
        seed: cohort seed; case ``i`` uses streams seeded by ``(seed, i)`` only.
        size: "full" (0.6-1.0 mm in-plane, 1-3 mm slices, ~80x80x60 mm field of view) or
            "small" (~2.5 mm voxels, ~32x32x28 voxels) for tests.
        mask_label: value of lesion voxels in the mask label maps.
        protocols: one acquisition protocol per site (params ``data.synthetic.protocols``, the
            first ``sites``); case ``i`` gets ``protocols[i % len(protocols)]``. None: one site,
            the cohort's own scanner variation only.
        overwrite: allow writing into a non-empty folder (files of the same name are replaced).
        show_progress: show a progress bar.

    Raises:
        SyntheticParamsError: invalid counts, size or mask_label.
        CohortExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
    """
    out_dir, protocols = Path(out_dir), list(protocols or [])
    _check_arguments(out_dir, n_cases=n_cases, n_positive=n_positive, size=size, mask_label=mask_label,
                     protocols=protocols, overwrite=overwrite)
    multi_site = len(protocols) > 1
    for sub in ("images", "masks", "annotator_masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)

    labels = case_labels(n_cases, n_positive, seed)
    rows: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    for index in progress(range(n_cases), total=n_cases, desc="synth", disable=not show_progress):
        params = sample_case_params(seed, index, int(labels[index]), size=size)
        protocol = protocols[index % len(protocols)] if protocols else None
        if protocol is not None:
            params = apply_protocol(params, protocol, size=size)
        rendered = render_case(params, render_rng(seed, index))
        cid = params.case_id
        paths = _write_case(out_dir, cid, rendered, mask_label)
        rows.append(
            {
                "case_id": cid,
                "label": str(params.label),
                **paths,
                **{f"spacing_{a}_mm": f"{v:.4f}" for a, v in zip("xyz", rendered.spacing, strict=True)},
                **({SITE_COLUMN: protocol.name} if multi_site else {}),
            }
        )
        record = _case_record(params, rendered.summary)
        if multi_site:
            record[SITE_COLUMN] = protocol.name
        cases.append(record)

    columns = (*MANIFEST_COLUMNS, SITE_COLUMN) if multi_site else MANIFEST_COLUMNS
    _write_manifest(out_dir / MANIFEST_NAME, rows, columns)
    summary = _cohort_summary(cases, labels, seed=seed, n_cases=n_cases, n_positive=n_positive, size=size,
                              mask_label=mask_label)
    if multi_site:
        summary["sites"] = [p.model_dump(mode="json") for p in protocols]
    write_json(out_dir / COHORT_JSON, json_rounded({**summary, "cases": cases}))
    # plain read permissions (temporary files and folders are created private)
    (out_dir / COHORT_JSON).chmod(0o644)
    out_dir.chmod(0o755)
    log.debug("wrote %d cases (%d positive) to %s; Bayes AUC %.3f, realised LLR AUC %.3f", n_cases, n_positive,
              out_dir, summary["bayes_auc"], summary["realised_llr_auc"])
    return json_rounded(summary)


def write_cohort(out_dir: str | Path, *, n_cases: int, n_positive: int, seed: int, size: str, mask_label: int,
                 protocols: Sequence[ProtocolSpec], show_progress: bool) -> dict[str, Any]:
    """:func:`generate_cohort` into a temporary folder beside ``out_dir``, which replaces ``out_dir``
    once every case is written: an interrupted run leaves ``out_dir`` as it was. The summary."""
    from bonemet.utils import atomic_path

    with atomic_path(Path(out_dir), is_dir=True) as tmp:
        return generate_cohort(tmp, n_cases=n_cases, n_positive=n_positive, seed=seed, size=size, mask_label=mask_label,
                               protocols=protocols, overwrite=True, show_progress=show_progress)


def _check_arguments(out_dir: Path, *, n_cases: int, n_positive: int, size: str, mask_label: int,
                     protocols: Sequence[ProtocolSpec], overwrite: bool) -> None:
    """Refuse :func:`generate_cohort`'s arguments before anything is written (see its Raises)."""
    check_counts(n_cases, n_positive)
    if size not in ("full", "small"):
        raise SyntheticParamsError(f"size must be 'full' or 'small'; found {size!r}")
    if not 1 <= int(mask_label) <= 255:
        raise SyntheticParamsError(f"mask_label must be in 1..255 (uint8 label map); found {mask_label}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CohortExistsError(f"{out_dir}: output folder is not empty (expected empty or missing)")
    names = [p.name for p in protocols]
    if len(set(names)) != len(names):
        raise SyntheticParamsError(f"protocol names must be unique; found {names}")


def _write_case(out_dir: Path, case_id: str, rendered: RenderedCase, mask_label: int) -> dict[str, str]:
    """Write a rendered case's CT (int16 HU) and its two masks (uint8, lesion == ``mask_label``);
    their paths relative to ``out_dir``, as the manifest names them."""
    paths = {
        "image": f"images/{case_id}.nii.gz",
        "mask": f"masks/{case_id}.nii.gz",
        "annotator_mask": f"annotator_masks/{case_id}.nii.gz",
    }
    write_image(
        _to_image(rendered.image, rendered.spacing, rendered.origin, sitk.sitkInt16),
        out_dir / paths["image"],
    )
    for key, mask in (("mask", rendered.manual), ("annotator_mask", rendered.annotator)):
        label_map = mask.astype(np.uint8) * np.uint8(mask_label)
        write_image(
            _to_image(label_map, rendered.spacing, rendered.origin, sitk.sitkUInt8), out_dir / paths[key]
        )
    return paths


def _cohort_summary(cases: Sequence[Mapping[str, Any]], labels: np.ndarray, *, seed: int, n_cases: int,
                    n_positive: int, size: str, mask_label: int) -> dict[str, Any]:
    """cohort.json's summary of the generated ``cases``: the arguments, the latent model, its Bayes
    AUC and what this cohort realised."""
    llr = np.array([c["llr"] for c in cases])
    summary: dict[str, Any] = {
        "generator": "bonemet.data.synthetic",
        "format_version": 1,
        "seed": int(seed),
        "n_cases": int(n_cases),
        "n_positive": int(n_positive),
        "size": size,
        "mask_label": int(mask_label),
        "latent_names": list(LATENT_NAMES),
        "model": {
            "mean_label0": list(MEAN_LABEL0),
            "mean_label1": list(MEAN_LABEL1),
            "covariance": [list(row) for row in COVARIANCE],
            "mahalanobis_distance": mahalanobis_distance(),
            "note": "latents | label ~ N(mean_label, covariance); size and scanner independent of label",
        },
        "bayes_auc": bayes_auc(),
        "bayes_auc_method": "exact: Phi(mahalanobis_distance / sqrt(2)) for Gaussian latents with a shared covariance",
        "single_latent_auc": single_latent_auc(),
        "realised_llr_auc": empirical_auc(llr, labels),
        "dice_annotator_mean": float(np.mean([c["dice_annotator"] for c in cases])),
        "lesion_volume_ml_median": float(np.median([c["lesion_volume_ml"] for c in cases])),
    }
    return summary


def _case_record(params: CaseParams, render_summary: dict[str, Any]) -> dict[str, Any]:
    record = params.as_dict()
    record["latents"] = params.latents()
    record.update(render_summary)
    return record


def _write_manifest(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    lines = [",".join(columns)]
    lines += [",".join(str(row[c]) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_cases(cohort_dir: str | Path, case_ids: list[str] | None, path: str | Path, *, mask_label: int,
               grid_tolerance_mm: float, n: int = 4) -> Path:
    """Figure of a few cases: axial slice through the lesion with mask contours, and a sagittal view.

    ``case_ids`` None picks the first ``n`` cases of each label alternately. Returns ``path``.
    """
    from bonemet.data.synthetic_figure import plot_cohort_cases

    return plot_cohort_cases(cohort_dir, case_ids, path, mask_label=mask_label, grid_tolerance_mm=grid_tolerance_mm,
                             n=n)


def read_cohort_ceiling(cohort_dir: str | Path) -> tuple[float | None, dict[str, float] | None]:
    """A synthetic cohort's Bayes-optimal AUC and each case's latent log-likelihood ratio, from its
    ``cohort.json``; ``(None, None)`` for a cohort without one (a user's)."""
    import json

    path = Path(cohort_dir) / COHORT_JSON
    if not path.is_file():
        return None, None
    cohort = json.loads(path.read_text(encoding="utf-8"))
    case_llr = {str(c["case_id"]): float(c["llr"]) for c in cohort.get("cases", [])
                if "case_id" in c and c.get("llr") is not None} or None
    log.info("cohort ceiling from %s: Bayes-optimal AUC %s", path, cohort.get("bayes_auc"))
    return cohort.get("bayes_auc"), case_llr


def case_counts(n: int | None, n_positive: int | None, default_n: int, default_positive: int) -> tuple[int, int]:
    """Case counts from explicit arguments and params defaults; --n alone keeps the params' class ratio."""
    n_cases = default_n if n is None else n
    if n_positive is None:
        if n is None:
            n_positive = default_positive
        else:
            n_positive = min(max(1, round(n_cases * default_positive / default_n)), max(1, n_cases - 1))
    return n_cases, n_positive
