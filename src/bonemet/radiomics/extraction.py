"""PyRadiomics feature extraction per mask and per cohort (parallel, cached per case).

Features are computed from the HU images (PyRadiomics resamples internally), never from the
normalised network inputs. Masks are checked before PyRadiomics sees them so that a bad mask
gives an error naming the case, the file and the reason instead of a bare PyRadiomics message.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from bonemet.data.dicom_masks import MaskFormatError, mask_format, read_lesion_mask
from bonemet.data.io import read_image, read_mask, resample_to_reference, same_grid
from bonemet.errors import UserError
from bonemet.radiomics.settings import settings_digest
from bonemet.utils import atomic_path, die_with_parent, file_md5, progress

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import ComputeSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cache entry layout changes (2: entries carry a digest of their content)


class BadMaskError(UserError, ValueError):
    """A mask cannot give features (empty, one voxel, outside the image, rejected by PyRadiomics)."""

    def __init__(self, case_id: str, mask: str | Path | None, reason: str) -> None:
        self.case_id = case_id
        self.mask = str(mask) if mask is not None else None
        self.reason = reason
        where = f" ({self.mask})" if self.mask else ""
        super().__init__(f"case '{case_id}'{where}: {reason}")


class FeatureNameMismatchError(UserError, ValueError):
    """Two cases gave different feature names under the same settings."""


@dataclass(frozen=True)
class CaseInput:
    """One mask to extract: the case, its label (0/1), the image and mask files, and the lesion's
    ROI / segment when the mask is a DICOM RTSTRUCT / SEG."""

    case_id: str
    label: int
    image: Path
    mask: Path
    roi: str | None = None
    seg_segment: int | str | None = None


@dataclass
class CohortStats:
    """What :func:`extract_cohort` did, for logging and MLflow (seconds, MiB)."""

    n_cases: int = 0
    n_cached: int = 0
    n_extracted: int = 0
    n_dropped: int = 0
    seconds: float = 0.0
    peak_worker_rss_mib: float = 0.0


# ----------------------------------------------------------------------------------------------
# one mask


def _binary_mask(mask: sitk.Image, label: int) -> sitk.Image:
    return sitk.Cast(sitk.Equal(sitk.Cast(mask, sitk.sitkInt32), int(label)), sitk.sitkUInt8)


def _count(mask: sitk.Image) -> int:
    return int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))


def check_mask(
    image: sitk.Image, mask: sitk.Image, case_id: str, mask_file: str | Path | None, *, grid_tolerance_mm: float
) -> sitk.Image:
    """Check a binary (0/1) mask against its image; return it on the image grid.

    A mask whose spacing or origin differs from the image's by more than ``grid_tolerance_mm``
    but that overlaps the image is resampled onto the image grid (nearest neighbour). Raises
    :class:`BadMaskError` for an empty, one-voxel or out-of-image mask.
    """
    n_voxels = _count(mask)
    if n_voxels == 0:
        raise BadMaskError(case_id, mask_file, "mask is empty: expected at least 2 lesion voxels, found 0")
    if n_voxels == 1:
        raise BadMaskError(
            case_id, mask_file, "mask has a single lesion voxel: expected at least 2 (shape and texture need a region)"
        )
    ok, reason = same_grid(image, mask, tol_mm=grid_tolerance_mm)
    if ok:  # within tolerance: the image's exact geometry from here on (PyRadiomics compares them exactly)
        mask = sitk.Image(mask)
        mask.CopyInformation(image)
    else:
        moved = resample_to_reference(mask, image, sitk.sitkNearestNeighbor, 0)
        inside = _count(moved)
        if inside == 0:
            raise BadMaskError(
                case_id,
                mask_file,
                f"mask lies outside the image: its grid ({reason}) does not overlap the image's "
                f"(origin {tuple(round(v, 2) for v in image.GetOrigin())} mm, size {image.GetSize()})",
            )
        if inside < 2:
            raise BadMaskError(case_id, mask_file, f"mask keeps {inside} voxel inside the image grid: expected at least 2")
        log.warning("case '%s': mask grid differs from the image's (%s); resampled onto the image grid", case_id, reason)
        mask = moved
    return mask


_CHATTY_LOGGERS = ("radiomics", "pykwalify")


@contextlib.contextmanager
def _quiet_radiomics() -> Iterator[None]:
    """Silence PyRadiomics' and its schema validator's loggers for the duration."""
    import radiomics  # noqa: F401  - its import sets its logger's level: import first, then override
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, previous, strict=True):
            lg.setLevel(level)


_EXTRACTORS: dict[str, Any] = {}
_MAX_EXTRACTORS = 8


def _extractor(params: Mapping[str, Any]) -> Any:
    """A RadiomicsFeatureExtractor for these settings, built once per process.

    Building one validates the settings against PyRadiomics' schema (~0.15 s, about a tenth of a
    full-size case), so workers keep it between cases. ``execute`` does not change the extractor.
    """
    from radiomics import featureextractor

    key = json.dumps(params, sort_keys=True, default=str)
    extractor = _EXTRACTORS.get(key)
    if extractor is None:
        if len(_EXTRACTORS) >= _MAX_EXTRACTORS:
            _EXTRACTORS.clear()
        extractor = _EXTRACTORS[key] = featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(dict(params)))
    return extractor


def extract_features(
    image: sitk.Image | str | Path,
    mask: sitk.Image | str | Path,
    settings: Mapping[str, Any],
    case_id: str,
    *,
    grid_tolerance_mm: float,
    roi: str | None = None,
    seg_segment: int | str | None = None,
) -> dict[str, float]:
    """PyRadiomics features of one lesion mask, diagnostics dropped, in PyRadiomics' order.

    Args:
        image: the CT (HU) as a SimpleITK image, a file or a DICOM series folder.
        mask: label map (image or file), or a DICOM RTSTRUCT / SEG file; the lesion of a label
            map is ``settings["setting"]["label"]``.
        settings: PyRadiomics settings dict (``imageType``, ``featureClass``, ``setting``).
        case_id: names the case in errors.
        grid_tolerance_mm: how far (mm) the mask's spacing and origin may differ from the image's
            before the mask is resampled onto the image grid.
        roi, segment: the lesion's ROI (RTSTRUCT) or segment (SEG) when ``mask`` is such a file:
            it is then read onto the image by
            :func:`~bonemet.data.dicom_masks.read_lesion_mask` (as every stage reads it).

    Raises:
        BadMaskError: empty, one-voxel or out-of-image mask, or a mask PyRadiomics rejects.
        bonemet.data.dicom_masks.MaskFormatError: an RTSTRUCT / SEG that does not fit the image.
    """
    label = int(settings["setting"]["label"])
    mask_file = None if isinstance(mask, sitk.Image) else Path(mask)
    image_path = None if isinstance(image, sitk.Image) else Path(image)
    if not isinstance(image, sitk.Image):
        image = read_image(image, case_id=case_id)
    if isinstance(mask, sitk.Image):
        mask = _binary_mask(mask, label)
    elif mask_format(mask_file, case_id=case_id) != "labelmap":
        mask = read_lesion_mask(mask_file, image, label=label, roi=roi, seg_segment=seg_segment, case_id=case_id,
                                grid_tolerance_mm=grid_tolerance_mm, reference_image_path=image_path)
    else:  # a label map: on another grid it is resampled onto the image (check_mask), not refused
        mask = read_mask(mask, label=label, case_id=case_id)
    mask = check_mask(image, mask, case_id, mask_file, grid_tolerance_mm=grid_tolerance_mm)

    params = {key: dict(settings.get(key) or {}) for key in ("imageType", "featureClass", "setting")}
    params["setting"]["label"] = 1  # the mask is binary from here on
    params["setting"]["additionalInfo"] = False
    with _quiet_radiomics():  # its INFO chatter and logged errors; ValueErrors are rephrased below
        extractor = _extractor(params)
        try:
            result = extractor.execute(image, mask)
        except ValueError as exc:
            raise BadMaskError(case_id, mask_file, f"PyRadiomics rejected the mask: {exc}") from exc
    return {name: float(value) for name, value in result.items() if not name.startswith("diagnostics_")}


# ----------------------------------------------------------------------------------------------
# cache


def cache_key(image: str | Path, mask: str | Path, settings: Mapping[str, Any], *,
              roi: str | None = None, seg_segment: int | str | None = None) -> str:
    """Hash of the image bytes (a DICOM folder's files), the mask bytes, the lesion's ROI /
    segment in a DICOM mask, the settings and the PyRadiomics version."""
    h = hashlib.sha256()
    parts = [str(CACHE_FORMAT), file_md5(image), file_md5(mask), settings_digest(settings)]
    if roi is not None or seg_segment is not None:  # label maps keep the keys they always had
        parts.append(json.dumps({"roi": roi, "segment": seg_segment}, sort_keys=True))
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _entry_digest(names: list[str], values: list[float]) -> str:
    return hashlib.sha256(json.dumps([names, values]).encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, float] | None:
    """A verified cache entry, or None (missing; or unreadable, incomplete or altered: then it is
    extracted again and rewritten)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        names, values = list(entry["names"]), [float(v) for v in entry["values"]]
        if entry["digest"] != _entry_digest(names, values):
            raise ValueError("its content does not match its digest")
        return dict(zip(names, values, strict=True))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a corrupt entry is simply recomputed
        log.warning("%s: unreadable cache entry (%s); extracting again", path, exc)
        return None


def _write_cache(path: Path, case_id: str, features: Mapping[str, float]) -> None:
    names, values = list(features), [float(v) for v in features.values()]
    entry = {"case_id": case_id, "names": names, "values": values, "digest": _entry_digest(names, values)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(entry), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# cohort


def _init_worker(sitk_threads: int) -> None:
    """Pool initializer: one SimpleITK thread per worker (the processes are the parallelism); the
    worker dies with the stage (:func:`~bonemet.utils.die_with_parent`)."""
    die_with_parent()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(sitk_threads))
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _extract_task(
    case: CaseInput, settings: Mapping[str, Any], cache_file: str | None, grid_tolerance_mm: float
) -> tuple[str, dict[str, float] | None, str | None, float]:
    """Worker: extract one case, write its cache entry; returns (case_id, features, bad-mask reason, RSS MiB)."""
    try:
        features = extract_features(case.image, case.mask, settings, case.case_id,
                                    grid_tolerance_mm=grid_tolerance_mm, roi=case.roi, seg_segment=case.seg_segment)
    except BadMaskError as exc:
        return case.case_id, None, exc.reason, _peak_rss_mib()
    except MaskFormatError as exc:  # an RTSTRUCT/SEG that gives no lesion on this image: a bad mask too
        return case.case_id, None, str(exc), _peak_rss_mib()
    if cache_file is not None:
        _write_cache(Path(cache_file), case.case_id, features)
    return case.case_id, features, None, _peak_rss_mib()


def _peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def resolve_n_jobs(n_jobs: int) -> int:
    """-1 means all cores this process may run on; otherwise at least 1."""
    if n_jobs is None or n_jobs < 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return max(1, int(n_jobs))


def extract_cohort(
    cases: Sequence[CaseInput | tuple[str, int, str | Path, str | Path]],
    settings: Mapping[str, Any],
    *,
    n_jobs: int,
    compute: ComputeSpec,
    cache_dir: str | Path | None,
    allow_drop: bool,
    grid_tolerance_mm: float,
    show_progress: bool = True,
    stats: CohortStats | None = None,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Features of every case: parallel across cases, cached per case.

    Args:
        cases: ``(case_id, label, image_path, mask_path)`` tuples (or :class:`CaseInput`).
        settings: PyRadiomics settings dict (see :mod:`bonemet.radiomics.settings`).
        n_jobs: worker processes; -1 = all cores; 1 = in this process (``compute.scheduler: local``).
        compute: the ``compute`` params: a local pool of ``n_jobs`` processes or a Dask cluster
            (:func:`bonemet.compute.case_executor`); the same table either way.
        cache_dir: folder of per-case cache entries keyed by image, mask and settings hashes;
            ``None`` disables the cache.
        allow_drop: drop cases with bad masks (reported in the second return value) instead of
            raising.
        grid_tolerance_mm: see :func:`extract_features`.
        show_progress: show a progress bar (cases done, rate, time left).
        stats: filled in with counts, seconds and the peak worker memory when given.

    Returns:
        ``(table, dropped)``: columns ``case_id``, ``label`` then the features (float64) in
        PyRadiomics' order, one row per kept case in input order; ``dropped`` lists
        ``(case_id, reason)``.

    Raises:
        BadMaskError: a bad mask when ``allow_drop`` is False (the message lists every bad case).
    """
    start = time.perf_counter()
    inputs = [c if isinstance(c, CaseInput) else CaseInput(str(c[0]), int(c[1]), Path(c[2]), Path(c[3])) for c in cases]
    ids = [c.case_id for c in inputs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise BadMaskError(duplicates[0], None, f"duplicate case_id(s) in the extraction list: {', '.join(duplicates)}")
    cache_path, results, todo = _from_cache(inputs, settings, cache_dir)
    log.info("radiomics: %d case(s), %d from cache, %d to extract", len(inputs), len(results), len(todo))

    bad: dict[str, str] = {}
    peak_rss = 0.0
    for case_id, features, reason, rss in _extractions(todo, cache_path, settings, n_jobs=n_jobs, compute=compute,
                                                       grid_tolerance_mm=grid_tolerance_mm,
                                                       show_progress=show_progress):
        peak_rss = max(peak_rss, rss)
        if reason is not None:
            bad[case_id] = reason
        else:
            results[case_id] = features

    dropped = [(c.case_id, bad[c.case_id]) for c in inputs if c.case_id in bad]
    if dropped and not allow_drop:
        lines = "; ".join(f"case '{cid}' ({next(c.mask for c in inputs if c.case_id == cid)}): {why}" for cid, why in dropped)
        first = next(c for c in inputs if c.case_id == dropped[0][0])
        raise BadMaskError(first.case_id, None, f"{len(dropped)} bad mask(s), set allow_drop to drop them: {lines}")
    for case_id, reason in dropped:
        log.warning("case '%s': dropped (%s)", case_id, reason)

    table = _assemble(inputs, results)
    if stats is not None:
        stats.n_cases = len(inputs)
        stats.n_cached = len(inputs) - len(todo)
        stats.n_extracted = len(todo) - len(dropped)
        stats.n_dropped = len(dropped)
        stats.seconds = time.perf_counter() - start
        stats.peak_worker_rss_mib = peak_rss
    return table, dropped


def _from_cache(inputs: Sequence[CaseInput], settings: Mapping[str, Any], cache_dir: str | Path | None,
                ) -> tuple[dict[str, Path | None], dict[str, dict[str, float]], list[CaseInput]]:
    """Each case's cache entry (None without a cache), the features of the cases found there, and
    the cases left to extract, in input order."""
    cache_path: dict[str, Path | None] = {}
    results: dict[str, dict[str, float]] = {}
    cache_root = Path(cache_dir) if cache_dir is not None else None
    if cache_root is not None:
        cache_root.mkdir(parents=True, exist_ok=True)
    todo: list[CaseInput] = []
    for case in inputs:
        path = (cache_root / f"{cache_key(case.image, case.mask, settings, roi=case.roi, seg_segment=case.seg_segment)}.json"
                if cache_root is not None else None)
        cache_path[case.case_id] = path
        cached = _read_cache(path) if path is not None else None
        if cached is not None:
            results[case.case_id] = cached
        else:
            todo.append(case)
    return cache_path, results, todo


def _extractions(todo: Sequence[CaseInput], cache_path: Mapping[str, Path | None], settings: Mapping[str, Any], *,
                 n_jobs: int, compute: ComputeSpec, grid_tolerance_mm: float,
                 show_progress: bool) -> Iterator[tuple[str, dict[str, float] | None, str | None, float]]:
    """Extract (and cache) each case of ``todo``, in this process or on ``compute``'s workers:
    ``(case_id, features, why the mask is bad or None, the worker's peak RSS in MiB)``, in the
    order they finish."""
    from bonemet.compute import case_executor, runs_in_process

    workers = min(resolve_n_jobs(n_jobs), max(1, len(todo)))
    if not todo:
        return
    if runs_in_process(compute, workers):
        for case in progress(todo, total=len(todo), desc="radiomics", disable=not show_progress):
            path = cache_path[case.case_id]
            yield _extract_task(case, settings, str(path) if path else None, grid_tolerance_mm)
        return
    with case_executor(compute, workers=workers, initializer=_init_worker, initargs=(1,)) as pool:
        # absolute paths: a cluster's workers have their own working folder
        futures = [
            pool.submit(_extract_task, dataclasses.replace(case, image=case.image.absolute(), mask=case.mask.absolute()),
                        settings, str(cache_path[case.case_id].absolute()) if cache_path[case.case_id] else None,
                        grid_tolerance_mm)
            for case in todo
        ]
        for future in progress(as_completed(futures), total=len(futures), desc="radiomics", disable=not show_progress):
            yield future.result()


def _assemble(inputs: Sequence[CaseInput], results: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    kept = [c for c in inputs if c.case_id in results]
    if not kept:
        return pd.DataFrame({"case_id": pd.Series(dtype=str), "label": pd.Series(dtype="int64")})
    names = list(results[kept[0].case_id])
    for case in kept[1:]:
        other = results[case.case_id]
        if list(other) != names:
            missing = sorted(set(names) - set(other))[:5]
            extra = sorted(set(other) - set(names))[:5]
            raise FeatureNameMismatchError(
                f"case '{case.case_id}': feature names differ from case '{kept[0].case_id}' "
                f"(missing {missing}, extra {extra}, counts {len(other)} vs {len(names)})"
            )
    values = np.array([[results[c.case_id][n] for n in names] for c in kept], dtype=np.float64)
    table = pd.DataFrame(values, columns=names)
    table.insert(0, "label", np.array([c.label for c in kept], dtype=np.int64))
    table.insert(0, "case_id", [c.case_id for c in kept])
    return table


def expected_feature_names(settings: Mapping[str, Any]) -> list[str]:
    """The feature names (in order) the settings give, from a small built-in phantom.

    The phantom is a 2 x 2 x 2 cm noisy block holding a 6 mm-radius sphere on a 1 mm grid, so
    every image type and feature class yields its features; names do not depend on the data.
    """
    shape = (20, 20, 20)
    zz, yy, xx = np.indices(shape)
    centre = (np.array(shape) - 1) / 2.0
    inside = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= 6.0**2
    rng = np.random.default_rng(0)
    values = (rng.normal(100.0, 30.0, shape) + 300.0 * inside).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    phantom_settings = {key: dict(settings.get(key) or {}) for key in ("imageType", "featureClass", "setting")}
    phantom_settings["setting"]["label"] = 1
    return list(extract_features(image, mask, phantom_settings, case_id="<phantom>", grid_tolerance_mm=0.01))


def plain_pyradiomics(cases: Sequence[CaseInput | tuple], settings: Mapping[str, Any]) -> list[dict[str, float]]:
    """Reference loop for benchmarks: ``RadiomicsFeatureExtractor.execute`` on each case in turn.

    No checks, no cache, no processes: what a user of plain PyRadiomics would write.
    """
    from radiomics import featureextractor

    params = {key: dict(settings.get(key) or {}) for key in ("imageType", "featureClass", "setting")}
    out = []
    with _quiet_radiomics():  # same logging as ours: no INFO chatter
        extractor = featureextractor.RadiomicsFeatureExtractor(params)
        for case in cases:
            image, mask = (case.image, case.mask) if isinstance(case, CaseInput) else (case[2], case[3])
            result = extractor.execute(str(image), str(mask))
            out.append({k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")})
    return out
