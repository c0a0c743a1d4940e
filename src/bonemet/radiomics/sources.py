"""Feature tables for every mask source of a cohort: manual, automatic (MISSU) and annotator.

This is the library side of the ``extract`` stage: it takes explicit arguments (paths,
settings, a tracker) and writes ``<out_dir>/<source>.parquet`` plus ``dropped.json`` and
``summary.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from bonemet.config import MASK_SOURCES
from bonemet.data.manifest import Case
from bonemet.errors import UserError
from bonemet.radiomics.extraction import (
    BadMaskError,
    CaseInput,
    CohortStats,
    expected_feature_names,
    extract_cohort,
)
from bonemet.radiomics.settings import settings_digest
from bonemet.tracking.base import NullTracker, Tracker
from bonemet.utils import atomic_path, write_json

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import ComputeSpec

log = logging.getLogger(__name__)

#: mask sources, in the order features are extracted (:data:`bonemet.config.MASK_SOURCES`)
SOURCES = MASK_SOURCES
AUTO_MASK_SUFFIX = ".nii.gz"


class MissingMaskError(UserError, ValueError):
    """A case lacks its mask file for a source."""


def source_cases(
    cases: Sequence[Case], source: str, auto_masks_dir: str | Path | None = None
) -> tuple[list[CaseInput], list[tuple[str, str]]] | None:
    """The extraction inputs of one source, and the cases whose mask file is missing.

    Returns ``None`` when the source does not apply to this cohort: ``auto`` without the
    automatic-mask folder, ``annotator`` when no case has an annotator mask.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown mask source '{source}': expected one of {', '.join(SOURCES)}")
    inputs: list[CaseInput] = []
    missing: list[tuple[str, str]] = []
    if source == "auto":
        folder = Path(auto_masks_dir) if auto_masks_dir is not None else None
        if folder is None or not folder.is_dir():
            return None
    if source == "annotator" and not any(c.annotator_mask for c in cases):
        return None
    for case in cases:
        roi = seg_segment = None
        if source == "manual":
            ref = case.mask_ref("manual")
            mask, roi, seg_segment = ref.path, ref.roi, ref.seg_segment
        elif source == "annotator":
            if case.annotator_mask is None:
                continue  # only the cases a second reader segmented
            ref = case.mask_ref("annotator")
            mask, roi, seg_segment = ref.path, ref.roi, ref.seg_segment
        else:
            mask = folder / f"{case.case_id}{AUTO_MASK_SUFFIX}"
        if not Path(mask).is_file():
            missing.append((case.case_id, f"{source} mask file not found: {mask}"))
            continue
        inputs.append(CaseInput(case.case_id, case.label, Path(case.image), Path(mask), roi, seg_segment))
    return inputs, missing


def extract_sources(
    cases: Sequence[Case],
    settings: Mapping[str, Any],
    out_dir: str | Path,
    *,
    sources: Sequence[str],
    auto_masks_dir: str | Path | None,
    n_jobs: int,
    compute: ComputeSpec,
    cache_dir: str | Path | None,
    allow_drop: bool,
    grid_tolerance_mm: float,
    tracker: Tracker | None = None,
    show_progress: bool = True,
    log_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Extract, validate and write one feature table per source; returns the summary dict.

    Each table is checked with the feature-table rules (``bonemet.validation.features``)
    before it is written. A bad or missing mask fails the run unless ``allow_drop``; dropped
    cases go to ``dropped.json`` and to the tracker.

    Raises:
        BadMaskError / MissingMaskError: a bad or missing mask and ``allow_drop`` is False.
        FeatureTableError: a table broke a hard feature-table rule.
    """
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = expected_feature_names(settings)
    summary: dict[str, Any] = {"n_features": len(names), "settings_sha256": settings_digest(settings), "sources": {}}
    dropped_all: dict[str, list[dict[str, str]]] = {}
    extraction_seconds = 0.0
    with tracker.run("extract"):
        tracker.log_params({**(log_params or {}), "n_features": len(names), "settings_sha256": summary["settings_sha256"]})
        for source in sources:
            selected = source_cases(cases, source, auto_masks_dir)
            if selected is None:
                why = (
                    f"automatic-mask folder {auto_masks_dir} not found (run the segment stage first)"
                    if source == "auto"
                    else "no case has an annotator mask"
                )
                log.warning("source '%s' skipped: %s", source, why)
                summary["sources"][source] = {"skipped": why}
                continue
            inputs, missing = selected
            if missing and not allow_drop:
                raise MissingMaskError(
                    f"source '{source}': {len(missing)} case(s) lack a mask file (set radiomics.allow_drop to drop them): "
                    + "; ".join(f"case '{cid}': {why}" for cid, why in missing)
                )
            extraction = {"n_jobs": n_jobs, "compute": compute, "cache_dir": cache_dir, "allow_drop": allow_drop,
                          "grid_tolerance_mm": grid_tolerance_mm, "show_progress": show_progress}
            metrics, dropped_rows, seconds = _extract_source(source, inputs, missing, settings, out_dir, names,
                                                             tracker, extraction)
            extraction_seconds += seconds
            dropped_all[source] = dropped_rows
            summary["sources"][source] = metrics
        write_json(out_dir / "dropped.json", dropped_all)
        write_json(out_dir / "summary.json", summary)
        total = {f"{s}_n_dropped": len(v) for s, v in dropped_all.items()}
        total["n_dropped"] = sum(len(v) for v in dropped_all.values())
        total["extraction_seconds"] = extraction_seconds
        tracker.log_metrics(total)
        tracker.log_artifact(out_dir / "dropped.json")
        tracker.log_artifact(out_dir / "summary.json")
    return summary


def _extract_source(source: str, inputs: Sequence[CaseInput], missing: Sequence[tuple[str, str]],
                    settings: Mapping[str, Any], out_dir: Path, names: Sequence[str], tracker: Tracker,
                    extraction: Mapping[str, Any]) -> tuple[dict[str, int], list[dict[str, str]], float]:
    """Extract, check and write ``source``'s table in its nested tracker run (``extraction``: the
    keyword arguments of :func:`extract_cohort`; ``missing``: its cases without a mask file,
    dropped). Returns its summary (cases and dropped cases: what was extracted, not how long it
    took nor what a cache held), its dropped cases and its extraction seconds."""
    from bonemet.validation.features import assert_feature_table

    stats = CohortStats()
    with tracker.run(f"extract-{source}", nested=True):
        table, dropped = extract_cohort(inputs, settings, stats=stats, **extraction)
        dropped = [*missing, *dropped]
        if table.empty:
            raise BadMaskError("<all>", None, f"source '{source}': every case was dropped")
        assert_feature_table(table, names, source)
        _write_parquet(table, out_dir / f"{source}.parquet")
        rate = stats.n_extracted / stats.seconds * 60.0 if stats.seconds > 0 and stats.n_extracted else 0.0
        tracker.log_metrics({
            "n_cases": len(table),
            "n_cached": stats.n_cached,
            "n_extracted": stats.n_extracted,
            "n_dropped": len(dropped),
            "extraction_seconds": stats.seconds,
            "cases_per_minute": rate,
            "peak_worker_rss_mib": stats.peak_worker_rss_mib,
        })
        dropped_rows = [{"case_id": cid, "reason": why} for cid, why in dropped]
        if dropped_rows:
            tracker.log_dict({"dropped": dropped_rows}, f"dropped_{source}.json")
            tracker.set_tags({"dropped_cases": ",".join(cid for cid, _ in dropped)[:5000]})
    log.info(
        "source '%s': %d case(s) x %d features (%d cached, %d extracted, %d dropped) in %.1f s",
        source, len(table), len(names), stats.n_cached, stats.n_extracted, len(dropped), stats.seconds,
    )
    return {"n_cases": len(table), "n_dropped": len(dropped)}, dropped_rows, stats.seconds


def _write_parquet(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
