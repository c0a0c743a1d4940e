"""The cohort manifest: ``manifest.csv`` with one row per case.

Format (the one documented in the README):

    COHORT/
      manifest.csv          columns case_id,label,image,mask (+ any extra metadata columns)
      images/...            NIfTI (.nii, .nii.gz), NRRD (.nrrd) or DICOM series folders
      masks/...             label maps on the image grid; the lesion is voxels == mask_label

``image`` and ``mask`` are paths relative to the cohort folder. ``label`` is 1 for breast
origin, 0 for other origin. An optional ``annotator_mask`` column names a second reader's
mask (used to study reproducibility under segmentation). Extra columns are kept as metadata.

Optional columns (any may be absent; an empty cell means "not given"):

* ``roi``: the lesion's ROIName when ``mask`` is a DICOM RTSTRUCT (params ``data.roi`` when
  empty); ``segment``: its segment number (digits) or SegmentLabel when ``mask`` is a DICOM SEG
  (params ``data.segment``). ``annotator_roi`` / ``annotator_segment`` do the same for
  ``annotator_mask`` and default to the case's ``roi`` / ``segment``.
* ``patient_id``: several lesions or CTs of one patient share it; every split keeps a patient's
  cases together (:mod:`bonemet.splits`). When the column is present every row needs one.
* ``site``: the centre or scanner of the CT, for the optional ComBat harmonisation
  (params ``select.harmonize``).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bonemet.errors import UserError

REQUIRED_COLUMNS = ("case_id", "label", "image", "mask")
#: What each label means, for figures and tables (``label`` 1: breast origin)
LABEL_NAMES = {0: "other", 1: "breast"}
OPTIONAL_PATH_COLUMNS = ("annotator_mask",)
#: Optional columns with a meaning (not kept as metadata).
MASK_REF_COLUMNS = ("roi", "segment", "annotator_roi", "annotator_segment")
PATIENT_COLUMN = "patient_id"
SITE_COLUMN = "site"
OPTIONAL_COLUMNS = (*OPTIONAL_PATH_COLUMNS, *MASK_REF_COLUMNS, PATIENT_COLUMN, SITE_COLUMN)
MANIFEST_NAME = "manifest.csv"
#: A case id names output files (``<case_id>.nii.gz``...): letters, digits, '.', '_', '-', not
#: starting with a dot, and short enough for any file system.
CASE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_ID_LENGTH = 64


class ManifestError(UserError, ValueError):
    """The manifest is missing or malformed; the message names rows/cases and the problem."""


Segment = int | str


@dataclass(frozen=True)
class MaskRef:
    """Where one mask of a case is: the file, and which structure of it is the lesion.

    ``roi`` matters for an RTSTRUCT, ``seg_segment`` (number or label) for a DICOM SEG; a label map
    ignores both (its lesion is the voxels equal to ``data.mask_label``).
    """

    path: Path
    roi: str | None = None
    seg_segment: Segment | None = None


@dataclass(frozen=True)
class Case:
    """One case of a cohort: its id, label, absolute paths to image and masks, and (optional)
    the RTSTRUCT ROI / SEG segment of each mask, its patient and its site."""

    case_id: str
    label: int
    image: Path
    manual_mask: Path
    annotator_mask: Path | None = None
    metadata: dict = field(default_factory=dict, compare=False)
    roi: str | None = None
    seg_segment: Segment | None = None
    annotator_roi: str | None = None
    annotator_seg_segment: Segment | None = None
    #: None: the manifest has no patient_id column (each case is its own patient)
    patient_id: str | None = None
    site: str | None = None

    def mask_ref(self, kind: str) -> MaskRef:
        """The manual (``kind="manual"``) or annotator mask with its ROI / segment."""
        if kind == "manual":
            return MaskRef(self.manual_mask, self.roi, self.seg_segment)
        if kind == "annotator":
            if self.annotator_mask is None:
                raise ManifestError(f"case '{self.case_id}': no annotator_mask in the manifest")
            return MaskRef(self.annotator_mask, self.annotator_roi or self.roi,
                           self.annotator_seg_segment if self.annotator_seg_segment is not None else self.seg_segment)
        raise ValueError(f"mask kind must be 'manual' or 'annotator', found {kind!r}")

    @property
    def patient(self) -> str:
        """The patient the splits group by: ``patient_id``, or the case itself without the column."""
        return self.patient_id if self.patient_id is not None else self.case_id


def parse_segment(value: str | int | None) -> Segment | None:
    """A manifest's segment cell: digits are a segment number, other text a SegmentLabel, empty None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if not text:
        return None
    return int(text) if text.isdigit() else text


def read_manifest_table(cohort_dir: str | Path, *, pseudonym_key: bytes | None) -> pd.DataFrame:
    """Read ``manifest.csv`` as strings (no type coercion), checking the required columns.

    With ``pseudonym_key`` (``data.pseudonymize``), non-empty ``case_id`` and ``patient_id``
    cells are replaced by their pseudonyms (:mod:`bonemet.data.pseudonym`) before anything else
    sees them; the manifest file itself is only read.
    """
    cohort_dir = Path(cohort_dir)
    path = cohort_dir / MANIFEST_NAME
    if not cohort_dir.is_dir():
        raise ManifestError(f"cohort folder not found: {cohort_dir}")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (expected columns {','.join(REQUIRED_COLUMNS)})")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is fine
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8 CSV "
                            "(e.g. LibreOffice/Excel 'CSV UTF-8')") from exc
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        header = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as exc:  # e.g. a NUL byte or a lone carriage return inside a field
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from exc
    names = [c.strip() for c in header]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ManifestError(f"{path}: column(s) {', '.join(repeated)} appear more than once in the header; "
                            "keep one of each")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from exc
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    for col in table.columns:
        table[col] = table[col].str.strip()
    if pseudonym_key is not None:
        from bonemet.data.pseudonym import pseudonym

        for col in ("case_id", PATIENT_COLUMN):
            if col in table.columns:
                table[col] = [pseudonym(v, pseudonym_key) if v else v for v in table[col]]
    return table


def _id_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot name output files, or None."""
    if len(case_id) > MAX_ID_LENGTH:
        return f"case_id is {len(case_id)} characters long; at most {MAX_ID_LENGTH} (it names output files)"
    if not re.match(CASE_ID_PATTERN, case_id):
        return ("case_id must be letters, digits, '.', '_' or '-', not starting with '.', '_' or '-' "
                "(it names output files)")
    return None


def path_escapes(cohort_dir: Path, relative: str) -> bool:
    """Whether ``relative`` (a manifest path) leads outside the cohort folder: absolute, through
    '..', or through a link pointing out."""
    if Path(relative).is_absolute():
        return True
    root = cohort_dir.resolve()
    try:
        (cohort_dir / relative).resolve().relative_to(root)
    except ValueError:
        return True
    return False


def read_manifest(cohort_dir: str | Path, *, roi: str | None = None, seg_segment: Segment | None = None,
                  pseudonym_key: bytes | None = None) -> list[Case]:
    """Parse the manifest into :class:`Case` objects.

    Args:
        cohort_dir: the cohort folder.
        roi, seg_segment: the params defaults (``data.roi``, ``data.segment``) for rows whose
            ``roi`` / ``segment`` cell is absent or empty; None leaves them unset, so an RTSTRUCT
            or SEG mask without one is an error when it is read.
        pseudonym_key: replace case and patient ids by their pseudonyms (see
            :func:`read_manifest_table`); the extra metadata columns are then dropped, since they
            may identify too.

    Raises ManifestError for structural problems that make the cohort unusable (missing
    columns, empty or duplicate ids, labels outside {0, 1}, an empty patient_id in a manifest
    that has the column); file-level checks belong to :mod:`bonemet.validation`.
    """
    cohort_dir = Path(cohort_dir)
    table = read_manifest_table(cohort_dir, pseudonym_key=pseudonym_key)
    problems: list[str] = []
    if table.empty:
        raise ManifestError(f"{cohort_dir / MANIFEST_NAME}: manifest has no cases")
    dup = table["case_id"][table["case_id"].duplicated(keep=False)]
    for case_id in sorted(set(dup)):
        problems.append(f"case '{case_id}': duplicate case_id ({int((dup == case_id).sum())} rows)")
    cases: list[Case] = []
    extra = [] if pseudonym_key is not None else [c for c in table.columns
                                                  if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    has_patients = PATIENT_COLUMN in table.columns
    default_segment = parse_segment(seg_segment)
    for row_no, row in enumerate(table.itertuples(index=False), start=2):
        row = row._asdict()
        case_id = row["case_id"]
        if not case_id:
            problems.append(f"row {row_no}: empty case_id")
            continue
        if row["label"] not in ("0", "1"):
            problems.append(f"case '{case_id}': label '{row['label']}' is not 0 or 1")
            continue
        if not row["image"] or not row["mask"]:
            problems.append(f"case '{case_id}': empty image or mask path")
            continue
        bad_id = _id_problem(case_id)
        if bad_id:
            problems.append(f"case '{case_id[:MAX_ID_LENGTH]}': {bad_id}")
            continue
        outside = [f"{col} {row[col]!r}" for col in ("image", "mask", "annotator_mask")
                   if row.get(col) and path_escapes(cohort_dir, row[col])]
        if outside:
            problems.append(f"case '{case_id}': {', '.join(outside)} point(s) outside the cohort folder; give paths "
                            "relative to it, with no '..', absolute path or link leading out")
            continue
        if has_patients and not row[PATIENT_COLUMN]:
            problems.append(f"case '{case_id}': empty patient_id (the column is present: give every case its patient)")
            continue
        annot = row.get("annotator_mask") or None
        case_segment = parse_segment(row.get("segment"))
        cases.append(
            Case(
                case_id=case_id,
                label=int(row["label"]),
                image=cohort_dir / row["image"],
                manual_mask=cohort_dir / row["mask"],
                annotator_mask=(cohort_dir / annot) if annot else None,
                metadata={k: row[k] for k in extra},
                roi=row.get("roi") or roi,
                seg_segment=case_segment if case_segment is not None else default_segment,
                annotator_roi=row.get("annotator_roi") or None,
                annotator_seg_segment=parse_segment(row.get("annotator_segment")),
                patient_id=row[PATIENT_COLUMN] if has_patients else None,
                site=row.get(SITE_COLUMN) or None,
            )
        )
    if problems:
        raise ManifestError(f"{cohort_dir / MANIFEST_NAME}: " + "; ".join(problems))
    return cases


def manifest_sites(cohort_dir: str | Path, *, pseudonym_key: bytes | None) -> dict[str, str]:
    """Case id -> site (the manifest's ``site`` column) for every case that names one; empty
    without the column. What ComBat harmonisation (``select.harmonize``) reads."""
    return {c.case_id: c.site for c in read_manifest(cohort_dir, roi=None, seg_segment=None, pseudonym_key=pseudonym_key)
            if c.site}
