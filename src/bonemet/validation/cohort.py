"""Validation of a bring-your-own cohort: manifest, images and masks.

Two tables are built and checked with Great Expectations (through :mod:`bonemet.validation.gx`):

* the manifest itself (one row per manifest row): unique, file-name-safe case ids, labels in
  {0, 1}, both classes present, image and mask paths given, a patient_id on every row when the
  column is there (a site too, softly);
* one row of measurements per case, computed here by reading every image and mask once
  (read-only; nothing is ever written inside the cohort folder): whether each file exists and
  is readable, the image's dimension, spacing (mm) and intensity range (HU), whether each mask
  lies on its image's grid, how many voxels hold ``mask_label`` or other values, and the
  lesion volume (mL). A mask that is a DICOM RTSTRUCT or SEG is read as every stage reads it,
  by :func:`bonemet.data.dicom_masks.read_lesion_mask` (with the case's ``roi`` / ``segment``
  and the CT's series), and a failure (unknown ROI or segment, a structure outside the image
  or empty, a SEG on another grid, a file drawn on another series) breaks rule
  ``<mask>_dicom`` with that reader's message, which names the file, what it holds and the fix.

Every rule is a GX expectation over those tables; the :class:`CohortReport` turns the GX
results into per-case failures with readable details. Hard rules make the cohort unusable;
soft rules only warn. A file that cannot be read (missing, truncated, corrupt) is recorded as
a failure of that case and never stops the validation of the others.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import SimpleITK as sitk

from bonemet.data.dicom_masks import mask_format, read_lesion_mask
from bonemet.data.io import ImageReadError, read_image, same_grid
from bonemet.data.manifest import (
    CASE_ID_PATTERN,
    MANIFEST_NAME,
    MAX_ID_LENGTH,
    PATIENT_COLUMN,
    SITE_COLUMN,
    ManifestError,
    parse_segment,
    path_escapes,
    read_manifest_table,
)
from bonemet.data.masks import volume_ml
from bonemet.utils import atomic_path, progress, write_json
from bonemet.validation import REPORT_FILE
from bonemet.validation.gx import Rule, RuleResult, check_table

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import ValidateSpec

log = logging.getLogger(__name__)

LABELS = ("0", "1")
MASK_KINDS = ("mask", "annotator_mask")
MANIFEST_LEVEL = "(manifest)"

#: a rule plus how to word its failure for one case from that case's measurement row
Detail = Callable[[pd.Series], str]


class Failure(NamedTuple):
    """One broken rule: its name, ``"hard"`` or ``"soft"``, and what was expected and found."""

    rule: str
    severity: str
    detail: str


@dataclass
class CohortReport:
    """The outcome of :func:`validate_cohort`.

    Attributes:
        cohort_dir: the cohort folder as given.
        n_cases: number of manifest rows.
        failures: case id -> every rule that case broke (hard and soft), in rule order.
        manifest_failures: rules about the manifest as a whole (unreadable manifest, missing
            columns, one class only, no cases).
        measurements: one row per manifest row: what was measured on its files.
        rule_results: the raw GX outcome of every rule.
        params: the thresholds used.
    """

    cohort_dir: str
    n_cases: int
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    manifest_failures: list[Failure] = field(default_factory=list)
    measurements: pd.DataFrame = field(default_factory=pd.DataFrame)
    rule_results: list[RuleResult] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no hard rule failed (soft warnings allowed)."""
        return not self.hard_manifest_failures and not self.bad_cases

    @property
    def hard_manifest_failures(self) -> list[Failure]:
        return [f for f in self.manifest_failures if f.severity == "hard"]

    @property
    def bad_cases(self) -> list[str]:
        """Case ids with at least one hard failure."""
        return [c for c, fs in self.failures.items() if any(f.severity == "hard" for f in fs)]

    @property
    def warned_cases(self) -> list[str]:
        """Case ids with only soft failures."""
        return [c for c, fs in self.failures.items() if fs and all(f.severity == "soft" for f in fs)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN -> null), deterministic for the same cohort and params."""
        records = json.loads(self.measurements.to_json(orient="records")) if len(self.measurements) else []
        return {
            "cohort_dir": self.cohort_dir,
            "passed": self.passed,
            "n_cases": self.n_cases,
            "n_cases_failed": len(self.bad_cases),
            "n_cases_warned": len(self.warned_cases),
            "params": self.params,
            "manifest_failures": [f._asdict() for f in self.manifest_failures],
            "cases": {case: [f._asdict() for f in fs] for case, fs in self.failures.items()},
            "rules": [
                {
                    "rule": r.rule,
                    "severity": r.severity,
                    "success": r.success,
                    "failing_ids": r.failing_ids,
                    "detail": r.detail,
                }
                for r in self.rule_results
            ],
            "measurements": records,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def summary(self) -> str:
        """One line: verdict and counts."""
        verdict = "PASSED" if self.passed else "FAILED"
        parts = [
            f"{len(self.bad_cases)} case(s) with hard failures",
            f"{len(self.warned_cases)} with warnings only",
        ]
        if self.manifest_failures:
            parts.append(f"{len(self.manifest_failures)} manifest-level failure(s)")
        return f"cohort {self.cohort_dir}: {self.n_cases} case(s), {verdict} ({', '.join(parts)})"

    def summary_text(self) -> str:
        """The verdict, then one block per failing case listing each rule broken."""
        return self.to_text(with_rules=False)

    def to_text(self, with_rules: bool = True) -> str:
        """Readable report: the verdict, one block per failing case listing each rule broken, and
        (``with_rules``) the list of rules checked with their outcome."""
        lines = [self.summary(), ""]
        if self.manifest_failures:
            lines.append("manifest:")
            lines += [f"  [{f.severity}] {f.rule}: {f.detail}" for f in self.manifest_failures]
            lines.append("")
        for case, fs in self.failures.items():
            lines.append(f"case '{case}':")
            lines += [f"  [{f.severity}] {f.rule}: {f.detail}" for f in fs]
            lines.append("")
        if self.passed and not self.failures and not self.manifest_failures:
            lines += ["every rule passed for every case.", ""]
        if with_rules and self.rule_results:
            lines.append("rules checked (Great Expectations):")
            for r in self.rule_results:
                n = len(r.failing_ids)
                outcome = "ok" if r.success else (f"FAILED for {n} case(s)" if n else "FAILED")
                lines.append(f"  {r.rule} [{r.severity}]: {outcome}")
        return "\n".join(lines).rstrip() + "\n"

    def write(self, report_dir: str | Path) -> None:
        """Write ``report.json`` and ``report.txt`` into ``report_dir`` (each atomically)."""
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        write_json(report_dir / REPORT_FILE, self.to_dict())
        with atomic_path(report_dir / "report.txt") as tmp:
            tmp.write_text(self.to_text(), encoding="utf-8")


# --------------------------------------------------------------------------- measurements
def _empty_image_measures() -> dict[str, Any]:
    return {
        "image_exists": None,
        "image_readable": None,
        "image_error": "",
        "image_3d": None,
        "image_shape": "",
        "spacing_min_mm": np.nan,
        "spacing_max_mm": np.nan,
        "spacing_mm": "",
        "hu_min": np.nan,
        "hu_max": np.nan,
        "hu_range": np.nan,
    }


def _empty_mask_measures(kind: str) -> dict[str, Any]:
    return {
        f"{kind}_exists": None,
        f"{kind}_readable": None,
        f"{kind}_error": "",
        f"{kind}_grid_ok": None,
        f"{kind}_grid_reason": "",
        f"{kind}_label_voxels": np.nan,
        f"{kind}_other_voxels": np.nan,
        f"{kind}_other_values": "",
        f"{kind}_volume_ml": np.nan,
        f"{kind}_format": "",
        f"{kind}_dicom_ok": None,
        f"{kind}_dicom_error": "",
    }


def _measure_image(path: Path, case_id: str) -> tuple[dict[str, Any], sitk.Image | None]:
    m = _empty_image_measures()
    m["image_exists"] = path.exists()
    if not m["image_exists"]:
        m["image_error"] = f"{path}: file not found"
        return m, None
    try:
        image = read_image(path, case_id=case_id)
    except (ImageReadError, OSError) as exc:  # OSError: e.g. permission denied
        m["image_readable"] = False
        m["image_error"] = str(exc)
        return m, None
    m["image_readable"] = True
    size = image.GetSize()
    m["image_shape"] = "x".join(str(s) for s in size)
    components = image.GetNumberOfComponentsPerPixel()
    m["image_3d"] = image.GetDimension() == 3 and min(size) > 1 and components == 1
    if components != 1:
        m["image_shape"] += f" ({components} components per voxel)"
    spacing = image.GetSpacing()
    m["spacing_min_mm"], m["spacing_max_mm"] = float(min(spacing)), float(max(spacing))
    m["spacing_mm"] = "x".join(f"{s:.4g}" for s in spacing)
    if components == 1:
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        m["hu_min"], m["hu_max"] = float(stats.GetMinimum()), float(stats.GetMaximum())
        m["hu_range"] = m["hu_max"] - m["hu_min"]
    return m, image


def _measure_dicom_mask(
    m: dict[str, Any], path: Path, kind: str, case_id: str, image: sitk.Image | None, image_path: Path | None,
    roi: str | None, seg_segment: int | str | None, mask_label: int, grid_tolerance_mm: float,
) -> dict[str, Any]:
    """An RTSTRUCT / SEG mask, read onto its image as every stage reads it."""
    m[f"{kind}_readable"] = True
    if image is None:  # nothing to rasterise onto: the image rules already fail
        return m
    try:
        mask = read_lesion_mask(path, image, label=mask_label, roi=roi, seg_segment=seg_segment, case_id=case_id,
                                grid_tolerance_mm=grid_tolerance_mm, reference_image_path=image_path)
    except (ImageReadError, OSError) as exc:  # MaskFormatError: the reader's message names file and fix
        m[f"{kind}_dicom_ok"] = False
        m[f"{kind}_dicom_error"] = str(exc)
        return m
    m[f"{kind}_dicom_ok"] = True
    m[f"{kind}_grid_ok"] = True  # rasterised / placed on the image's grid
    n_label = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    m[f"{kind}_label_voxels"] = n_label
    m[f"{kind}_other_voxels"] = 0
    m[f"{kind}_volume_ml"] = volume_ml(n_label, mask.GetSpacing())
    return m


def _measure_mask(
    path: Path | None,
    kind: str,
    case_id: str,
    image: sitk.Image | None,
    mask_label: int,
    grid_tolerance_mm: float,
    *,
    image_path: Path | None = None,
    roi: str | None = None,
    seg_segment: int | str | None = None,
) -> dict[str, Any]:
    m = _empty_mask_measures(kind)
    if path is None:
        return m
    m[f"{kind}_exists"] = path.exists()
    if not m[f"{kind}_exists"]:
        m[f"{kind}_error"] = f"{path}: file not found"
        return m
    try:
        m[f"{kind}_format"] = mask_format(path, case_id=case_id)
    except (ImageReadError, OSError) as exc:  # a damaged DICOM file, or a DICOM image that is no mask
        m[f"{kind}_readable"] = False
        m[f"{kind}_error"] = str(exc)
        return m
    if m[f"{kind}_format"] != "labelmap":
        return _measure_dicom_mask(m, path, kind, case_id, image, image_path, roi, seg_segment, mask_label,
                                   grid_tolerance_mm)
    try:
        mask = read_image(path, case_id=case_id)
    except (ImageReadError, OSError) as exc:  # OSError: e.g. permission denied
        m[f"{kind}_readable"] = False
        m[f"{kind}_error"] = str(exc)
        return m
    m[f"{kind}_readable"] = True
    if image is not None:
        ok, reason = same_grid(image, mask, tol_mm=grid_tolerance_mm)
        m[f"{kind}_grid_ok"], m[f"{kind}_grid_reason"] = ok, reason
    if mask.GetNumberOfComponentsPerPixel() != 1:
        m[f"{kind}_error"] = f"{path}: mask has {mask.GetNumberOfComponentsPerPixel()} components per voxel"
        m[f"{kind}_readable"] = False
        return m
    arr = sitk.GetArrayViewFromImage(mask)
    if not np.issubdtype(arr.dtype, np.integer) and not np.array_equal(arr, np.rint(arr)):
        m[f"{kind}_readable"] = False
        m[f"{kind}_error"] = f"{path}: mask holds non-integer values; expected a label map"
        return m
    is_label = arr == mask_label
    n_label = int(np.count_nonzero(is_label))
    other = (arr != 0) & ~is_label
    n_other = int(np.count_nonzero(other))
    m[f"{kind}_label_voxels"] = n_label
    m[f"{kind}_other_voxels"] = n_other
    if n_other:
        values = np.unique(arr[other])
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
        m[f"{kind}_other_values"] = shown
    m[f"{kind}_volume_ml"] = volume_ml(n_label, mask.GetSpacing())
    return m


def measure_cohort(
    cohort_dir: str | Path,
    table: pd.DataFrame,
    *,
    mask_label: int,
    grid_tolerance_mm: float,
    roi: str | None,
    seg_segment: int | str | None,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Read every case's image and masks once and return one row of measurements per manifest row.

    Columns: ``case_id`` (or ``row N`` for an empty id), ``row`` (1-based CSV line), then image
    measures (exists, readable, error, 3d, shape, spacing in mm, HU min/max/range) and, for
    ``mask`` and ``annotator_mask``, exists/readable/error, grid_ok/grid_reason, label_voxels
    (voxels == ``mask_label``), other_voxels (non-zero voxels of another value), other_values,
    volume_ml (label voxels x voxel volume, mL), format (labelmap, rtstruct, seg), and for a
    DICOM mask dicom_ok/dicom_error (read onto the image with the row's roi / segment, else the
    params defaults ``roi`` / ``segment``). Values that could not be measured are null.
    """
    cohort_dir = Path(cohort_dir)
    rows: list[dict[str, Any]] = []
    records = table.to_dict(orient="records")
    for row_no, rec in enumerate(
        progress(records, total=len(records), desc="validate", disable=not show_progress), 2
    ):
        case_id = rec["case_id"] or f"row {row_no}"
        out: dict[str, Any] = {"case_id": case_id, "row": row_no}
        # a path leading out of the cohort is never read (the paths_inside_cohort rule reports it)
        image_path = cohort_dir / rec["image"] if rec.get("image") and not path_escapes(cohort_dir, rec["image"]) \
            else None
        if image_path is not None:
            measures, image = _measure_image(image_path, case_id)
        else:
            measures, image = _empty_image_measures(), None
        out.update(measures)
        case_roi = rec.get("roi") or roi
        case_segment = parse_segment(rec.get("segment"))
        case_segment = case_segment if case_segment is not None else parse_segment(seg_segment)
        refs = {"mask": (case_roi, case_segment),
                "annotator_mask": (rec.get("annotator_roi") or case_roi,
                                   parse_segment(rec.get("annotator_segment")) or case_segment)}
        for kind in MASK_KINDS:
            rel = rec.get(kind) or ""
            rel = "" if rel and path_escapes(cohort_dir, rel) else rel
            kind_roi, kind_segment = refs[kind]
            out.update(
                _measure_mask(
                    cohort_dir / rel if rel else None, kind, case_id, image, mask_label, grid_tolerance_mm,
                    image_path=image_path, roi=kind_roi, seg_segment=kind_segment,
                )
            )
        rows.append(out)
        del image
    frame = pd.DataFrame(rows)
    for col in frame.columns:
        if col.endswith(("_exists", "_readable", "_3d", "_grid_ok", "_dicom_ok")):
            frame[col] = frame[col].astype(object)
    return frame


# --------------------------------------------------------------------------- rules
def _fmt(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}".rstrip()


def _manifest_rules() -> list[tuple[Rule, Detail]]:
    rules: list[tuple[Rule, Detail]] = [
        (
            Rule(
                "case_id_unique",
                "ExpectColumnValuesToBeUnique",
                {"column": "case_id"},
                description="every case_id appears once in the manifest",
            ),
            lambda r: f"case_id '{r['case_id']}' appears on {r['n_rows_with_id']} rows of {MANIFEST_NAME}",
        ),
        (
            Rule(
                "case_id_format",
                "ExpectColumnValuesToMatchRegex",
                {"column": "case_id_raw", "regex": CASE_ID_PATTERN},
                description="case_id is non-empty and made of letters, digits, '.', '_', '-' (it names output files)",
            ),
            lambda r: f"case_id {r['case_id_raw']!r} on line {r['row']}: expected {CASE_ID_PATTERN}",
        ),
        (
            Rule(
                "case_id_length",
                "ExpectColumnValueLengthsToBeBetween",
                {"column": "case_id_raw", "max_value": MAX_ID_LENGTH},
                description=f"case_id is at most {MAX_ID_LENGTH} characters (it names output files)",
            ),
            lambda r: f"case_id on line {r['row']} is {len(r['case_id_raw'])} characters long: at most {MAX_ID_LENGTH}",
        ),
        (
            Rule(
                "paths_inside_cohort",
                "ExpectColumnValuesToBeInSet",
                {"column": "paths_inside", "value_set": [True]},
                description="image and mask paths are relative to the cohort folder and stay inside it",
            ),
            lambda r: (f"line {r['row']}: a path points outside the cohort folder ({r['paths_outside']}); give "
                       "paths relative to it, with no '..', absolute path or link leading out"),
        ),
        (
            Rule(
                "label_valid",
                "ExpectColumnValuesToBeInSet",
                {"column": "label", "value_set": list(LABELS)},
                description="label is 0 (other origin) or 1 (breast origin)",
            ),
            lambda r: f"label {r['label']!r} on line {r['row']}: expected 0 or 1",
        ),
        (
            Rule(
                "image_path_given",
                "ExpectColumnValueLengthsToBeBetween",
                {"column": "image", "min_value": 1},
                description="the image column names a file",
            ),
            lambda r: f"empty image path on line {r['row']}",
        ),
        (
            Rule(
                "mask_path_given",
                "ExpectColumnValueLengthsToBeBetween",
                {"column": "mask", "min_value": 1},
                description="the mask column names a file",
            ),
            lambda r: f"empty mask path on line {r['row']}",
        ),
    ]
    return rules


def _optional_column_rules(columns: Sequence[str]) -> list[tuple[Rule, Detail]]:
    """Rules of the optional columns the manifest has: a patient_id on every row (hard: the
    splits group by it), a site on every row (soft: only ComBat harmonisation needs it)."""
    rules: list[tuple[Rule, Detail]] = []
    if PATIENT_COLUMN in columns:
        rules.append((
            Rule("patient_id_given", "ExpectColumnValueLengthsToBeBetween", {"column": PATIENT_COLUMN, "min_value": 1},
                 description="every case names its patient (the splits keep a patient's cases together)"),
            lambda r: f"empty patient_id on line {r['row']}: give every case its patient, or drop the column",
        ))
    if SITE_COLUMN in columns:
        rules.append((
            Rule("site_given", "ExpectColumnValueLengthsToBeBetween", {"column": SITE_COLUMN, "min_value": 1},
                 severity="soft", description="every case names its site (select.harmonize needs it)"),
            lambda r: f"empty site on line {r['row']}: harmonisation (select.harmonize) would refuse this case",
        ))
    return rules


def _manifest_table_rules() -> list[tuple[Rule, str]]:
    return [
        (
            Rule(
                "has_cases",
                "ExpectTableRowCountToBeBetween",
                {"min_value": 1},
                description="the manifest lists at least one case",
            ),
            "the manifest lists no case",
        ),
        (
            Rule(
                "both_classes",
                "ExpectColumnDistinctValuesToContainSet",
                {"column": "label", "value_set": list(LABELS)},
                description="both classes (label 0 and label 1) are present",
            ),
            "",
        ),
    ]


#: how to word a case rule's failure from that case's measurement row, the mask column it checks
#: (``kind``; "" for the image's rules) and the thresholds (:func:`_case_rules`' ``limits``)
CaseDetail = Callable[[pd.Series, str, Mapping[str, Any]], str]


@dataclass(frozen=True)
class _CaseRule:
    """One row of the per-case rule tables below.

    ``name``, ``column`` and ``description`` are templates: ``{kind}`` is the mask column a mask
    rule checks (``mask`` or ``annotator_mask``), ``{min_spacing_mm}`` ... the thresholds.
    ``bounds`` are the expectation's keywords besides ``column``: a string names the threshold
    it takes, any other value is used as it is. A ``dicom_only`` rule applies to a mask column
    only when some of its masks are RTSTRUCT or SEG files.
    """

    name: str
    expectation: str
    column: str
    bounds: Mapping[str, Any]
    description: str
    detail: CaseDetail
    severity: str = "hard"
    dicom_only: bool = False

    def rule(self, limits: Mapping[str, Any], kind: str = "") -> tuple[Rule, Detail]:
        """The GX rule for ``kind`` under ``limits``, and its failure's wording for one row."""
        kwargs = {"column": self.column.format(kind=kind)}
        kwargs.update({key: limits[value] if isinstance(value, str) else value for key, value in self.bounds.items()})
        rule = Rule(
            self.name.format(kind=kind),
            self.expectation,
            kwargs,
            severity=self.severity,
            description=self.description.format(kind=kind, **limits),
        )
        return rule, lambda row: self.detail(row, kind, limits)


_IN_SET = "ExpectColumnValuesToBeInSet"
_BETWEEN = "ExpectColumnValuesToBeBetween"
_TRUE = {"value_set": [True]}

#: the image's rules, in report order
_IMAGE_RULES: tuple[_CaseRule, ...] = (
    _CaseRule("image_exists", _IN_SET, "image_exists", _TRUE, "the image file exists",
              lambda r, k, t: str(r["image_error"])),
    _CaseRule("image_readable", _IN_SET, "image_readable", _TRUE, "the image can be read (not truncated or corrupt)",
              lambda r, k, t: str(r["image_error"])),
    _CaseRule("image_3d", _IN_SET, "image_3d", _TRUE, "the image is a 3D scalar volume",
              lambda r, k, t: f"image size {r['image_shape']}: expected a 3D scalar volume with more than one slice"),
    _CaseRule("spacing_min", _BETWEEN, "spacing_min_mm", {"min_value": "min_spacing_mm"},
              "voxel spacing is at least {min_spacing_mm} mm",
              lambda r, k, t: f"spacing {r['spacing_mm']} mm: expected every axis >= {t['min_spacing_mm']} mm"),
    _CaseRule("spacing_max", _BETWEEN, "spacing_max_mm", {"max_value": "max_spacing_mm"},
              "voxel spacing is at most {max_spacing_mm} mm",
              lambda r, k, t: f"spacing {r['spacing_mm']} mm: expected every axis <= {t['max_spacing_mm']} mm"),
    _CaseRule("hu_min", _BETWEEN, "hu_min", {"min_value": "hu_min"}, "no intensity below {hu_min} HU",
              lambda r, k, t: (f"lowest intensity {_fmt(r['hu_min'], 'HU')}: expected >= {t['hu_min']} HU "
                               "(CT in Hounsfield units)")),
    _CaseRule("hu_max", _BETWEEN, "hu_max", {"max_value": "hu_max"}, "no intensity above {hu_max} HU",
              lambda r, k, t: (f"highest intensity {_fmt(r['hu_max'], 'HU')}: expected <= {t['hu_max']} HU "
                               "(CT in Hounsfield units)")),
    _CaseRule("hu_air_or_fat", _BETWEEN, "hu_min", {"max_value": "hu_air_max"},
              "some voxel is at or below {hu_air_max} HU (air or fat): true of CT, not of MR",
              lambda r, k, t: (f"intensities {_fmt(r['hu_min'])}..{_fmt(r['hu_max'])}: expected air/fat at or below "
                               f"{t['hu_air_max']} HU; not a CT in Hounsfield units (MR-like, or rescale "
                               "slope/intercept not applied?)")),
    _CaseRule("hu_range", _BETWEEN, "hu_range", {"min_value": "hu_min_range"},
              "intensities span at least {hu_min_range} HU (air/fat to bone)",
              lambda r, k, t: (f"intensities {_fmt(r['hu_min'])}..{_fmt(r['hu_max'])} span "
                               f"{_fmt(r['hu_range'], 'HU')}: expected >= {t['hu_min_range']} HU for a CT")),
)


def _label_detail(r: pd.Series, k: str, t: Mapping[str, Any]) -> str:
    other = r[f"{k}_other_values"]
    return f"{k} has no voxel == {t['mask_label']} (mask_label)" + (
        f"; it holds other values {other}" if other else "; it is empty"
    )


#: each mask column's rules, in report order
_MASK_RULES: tuple[_CaseRule, ...] = (
    _CaseRule("{kind}_exists", _IN_SET, "{kind}_exists", _TRUE, "the {kind} file exists",
              lambda r, k, t: str(r[f"{k}_error"])),
    _CaseRule("{kind}_readable", _IN_SET, "{kind}_readable", _TRUE, "the {kind} can be read (not truncated or corrupt)",
              lambda r, k, t: str(r[f"{k}_error"])),
    _CaseRule("{kind}_grid", _IN_SET, "{kind}_grid_ok", _TRUE, "the {kind} lies on its image's voxel grid",
              lambda r, k, t: f"{k} {r[f'{k}_grid_reason']}"),
    _CaseRule("{kind}_dicom", _IN_SET, "{kind}_dicom_ok", _TRUE,
              "an RTSTRUCT/SEG {kind} gives the lesion on its image: the case's ROI or segment exists, drawn on "
              "this series and grid, inside the image and not empty",
              lambda r, k, t: str(r[f"{k}_dicom_error"]), dicom_only=True),
    _CaseRule("{kind}_nonempty", _BETWEEN, "{kind}_label_voxels", {"min_value": 1},
              "the {kind} holds at least one voxel == {mask_label}", _label_detail),
    _CaseRule("{kind}_binary", _BETWEEN, "{kind}_other_voxels", {"max_value": 0},
              "the {kind} holds only 0 and {mask_label}",
              lambda r, k, t: (f"{k} has {_fmt(r[f'{k}_other_voxels'])} voxel(s) of other value(s) "
                               f"{r[f'{k}_other_values']}; only voxels == {t['mask_label']} are used as the lesion"),
              severity="soft"),
    _CaseRule("{kind}_volume", _BETWEEN, "{kind}_volume_ml", {"min_value": "volume_low_ml", "max_value": "volume_high_ml"},
              "the lesion in the {kind} is {volume_low_ml}-{volume_high_ml} mL",
              lambda r, k, t: (f"lesion volume {_fmt(r[f'{k}_volume_ml'], 'mL')}: "
                               f"expected {t['volume_low_ml']}-{t['volume_high_ml']} mL"),
              severity="soft"),
)


def _case_rules(
    *,
    mask_kinds: Sequence[str],
    min_spacing_mm: float,
    max_spacing_mm: float,
    hu_min: float,
    hu_max: float,
    hu_air_max: float,
    hu_min_range: float,
    lesion_volume_ml: tuple[float, float],
    mask_label: int,
    dicom_kinds: Sequence[str] = (),
) -> list[tuple[Rule, Detail]]:
    """The per-case rules: the image's (:data:`_IMAGE_RULES`), then each mask column's
    (:data:`_MASK_RULES`, the DICOM rule only for ``dicom_kinds``), under these thresholds."""
    low, high = lesion_volume_ml
    limits = {
        "min_spacing_mm": min_spacing_mm,
        "max_spacing_mm": max_spacing_mm,
        "hu_min": hu_min,
        "hu_max": hu_max,
        "hu_air_max": hu_air_max,
        "hu_min_range": hu_min_range,
        "volume_low_ml": low,
        "volume_high_ml": high,
        "mask_label": mask_label,
    }
    rules = [spec.rule(limits) for spec in _IMAGE_RULES]
    for kind in mask_kinds:
        rules += [spec.rule(limits, kind) for spec in _MASK_RULES if kind in dicom_kinds or not spec.dicom_only]
    return rules


def _collect(
    results: list[RuleResult],
    details: dict[str, Detail],
    table: pd.DataFrame,
    failures: dict[str, list[Failure]],
) -> None:
    """Add each failing id's failures (worded from its table row) to ``failures``."""
    first_row = table.drop_duplicates("case_id").set_index("case_id", drop=False)
    for res in results:
        for case_id in res.failing_ids:
            row = first_row.loc[case_id] if case_id in first_row.index else pd.Series(dtype=object)
            try:
                detail = details[res.rule](row)
            except (KeyError, TypeError, ValueError):
                detail = res.detail
            failures.setdefault(case_id, []).append(Failure(res.rule, res.severity, detail))


def _manifest_rows(table: pd.DataFrame, cohort_dir: Path) -> pd.DataFrame:
    """The manifest table with what its rules read: each row's line number, its raw case_id (an
    empty one named by its line), how many rows share its id, and its paths leading out of
    ``cohort_dir``."""
    manifest = table.copy()
    manifest["row"] = range(2, len(manifest) + 2)
    manifest["case_id_raw"] = manifest["case_id"]
    manifest["case_id"] = [
        cid or f"row {row}" for cid, row in zip(manifest["case_id"], manifest["row"], strict=True)
    ]
    manifest["n_rows_with_id"] = manifest.groupby("case_id")["case_id"].transform("size")
    outside = [[f"{col} {row[col]!r}" for col in ("image", "mask", "annotator_mask")
                if row.get(col) and path_escapes(cohort_dir, row[col])] for row in manifest.to_dict("records")]
    manifest["paths_outside"] = [", ".join(o) for o in outside]
    manifest["paths_inside"] = [not o for o in outside]
    return manifest


def _check_manifest(manifest: pd.DataFrame, columns: Sequence[str], failures: dict[str, list[Failure]],
                    manifest_failures: list[Failure]) -> list[RuleResult]:
    """Check the manifest's rows (their failures added to ``failures``, by case) and the table as a
    whole (added to ``manifest_failures``); the GX results of both."""
    row_rules = _manifest_rules() + _optional_column_rules(columns)
    table_rules = _manifest_table_rules()
    results = check_table(
        manifest, [r for r, _ in row_rules] + [r for r, _ in table_rules], suite_name="manifest"
    )
    _collect(results[: len(row_rules)], {r.name: d for r, d in row_rules}, manifest, failures)
    for (rule, text), res in zip(table_rules, results[len(row_rules) :], strict=True):
        if not res.success:
            if rule.name == "both_classes":
                found = sorted(set(manifest["label"]) & set(LABELS))
                text = f"labels present: {found or 'none'}; expected both 0 and 1"
            manifest_failures.append(Failure(rule.name, rule.severity, text))
    return list(results)


def validate_cohort(
    cohort_dir: str | Path,
    spec: ValidateSpec,
    *,
    mask_label: int,
    roi: str | None,
    seg_segment: int | str | None,
    pseudonym_key: bytes | None,
    show_progress: bool = True,
) -> CohortReport:
    """Check a bring-your-own cohort folder; never modifies it and never raises for bad data.

    Args:
        cohort_dir: folder with ``manifest.csv`` (case_id,label,image,mask[,annotator_mask]).
        spec: the ``validate`` params: ``min_spacing_mm``/``max_spacing_mm`` (plausible voxel
            spacing, every axis, mm); ``hu_min``/``hu_max`` (no voxel outside, HU; scanners pad
            outside the field of view with down to -3024 HU); ``hu_air_max`` (some voxel at or
            below it: air or fat, present in any CT, absent from MR or from CT stored without
            its rescale slope/intercept); ``hu_min_range`` (max - min at least this, HU);
            ``grid_tolerance_mm`` (a mask's spacing/origin vs its image's, mm);
            ``lesion_volume_ml`` (plausible lesion volume, mL; outside it only warns).
        mask_label: value of the lesion in the label maps (``data.mask_label``).
        roi, seg_segment: the lesion's ROI in RTSTRUCT masks / segment in SEG masks for rows whose
            manifest cell is empty (``data.roi``, ``data.segment``; None: the row must give it).
        show_progress: show a progress bar over cases.

    Returns:
        The :class:`CohortReport`; ``report.passed`` is False when any hard rule failed.
    """
    cohort_dir = Path(cohort_dir)
    low, high = (float(v) for v in spec.lesion_volume_ml)
    params = {
        "mask_label": int(mask_label),
        "min_spacing_mm": spec.min_spacing_mm,
        "max_spacing_mm": spec.max_spacing_mm,
        "hu_min": spec.hu_min,
        "hu_max": spec.hu_max,
        "hu_air_max": spec.hu_air_max,
        "hu_min_range": spec.hu_min_range,
        "grid_tolerance_mm": spec.grid_tolerance_mm,
        "lesion_volume_ml": [low, high],
        "roi": roi,
        "segment": seg_segment,
    }
    report = CohortReport(cohort_dir=str(cohort_dir), n_cases=0, params=params)
    try:
        table = read_manifest_table(cohort_dir, pseudonym_key=pseudonym_key)
    except ManifestError as exc:
        report.manifest_failures.append(Failure("manifest_readable", "hard", str(exc)))
        return report
    report.n_cases = len(table)

    # -- manifest rules (one row per manifest line)
    failures: dict[str, list[Failure]] = {}
    manifest = _manifest_rows(table, cohort_dir)
    rule_results = _check_manifest(manifest, list(table.columns), failures, report.manifest_failures)

    # -- per-case rules over the measurements
    measurements = measure_cohort(cohort_dir, table, mask_label=mask_label, grid_tolerance_mm=spec.grid_tolerance_mm,
                                  roi=roi, seg_segment=seg_segment, show_progress=show_progress)
    kinds = ["mask"]
    if "annotator_mask" in table.columns and (table["annotator_mask"] != "").any():
        kinds.append("annotator_mask")
    case_rules = _case_rules(
        mask_kinds=kinds, min_spacing_mm=spec.min_spacing_mm, max_spacing_mm=spec.max_spacing_mm, hu_min=spec.hu_min,
        hu_max=spec.hu_max, hu_air_max=spec.hu_air_max, hu_min_range=spec.hu_min_range, lesion_volume_ml=(low, high),
        mask_label=mask_label,
        dicom_kinds=[k for k in kinds if measurements[f"{k}_format"].isin(["rtstruct", "seg"]).any()],
    )
    results = check_table(measurements, [r for r, _ in case_rules], suite_name="cases")
    _collect(results, {r.name: d for r, d in case_rules}, measurements, failures)
    rule_results += results

    # failures in manifest order, each case's rules in rule order
    order = list(dict.fromkeys(manifest["case_id"]))
    report.failures = {case: failures[case] for case in order if case in failures}
    report.measurements = measurements
    report.rule_results = rule_results
    return report
