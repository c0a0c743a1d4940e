"""The cohort manifest: ``manifest.csv`` with one row per case.

Format (the one documented in the README):

    COHORT/
      manifest.csv          columns case_id,label,image,mask (+ any extra metadata columns)
      images/...            NIfTI (.nii, .nii.gz), NRRD (.nrrd) or DICOM series folders
      masks/...             label maps on the image grid; the lesion is voxels == mask_label

``image`` and ``mask`` are paths relative to the cohort folder. ``label`` is 1 for breast
origin, 0 for other origin. An optional ``annotator_mask`` column names a second reader's
mask (used to study reproducibility under segmentation). Extra columns are kept as metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bonemet.errors import UserError

REQUIRED_COLUMNS = ("case_id", "label", "image", "mask")
OPTIONAL_PATH_COLUMNS = ("annotator_mask",)
MANIFEST_NAME = "manifest.csv"


class ManifestError(UserError, ValueError):
    """The manifest is missing or malformed; the message names rows/cases and the problem."""


@dataclass(frozen=True)
class Case:
    """One case of a cohort: its id, label, and absolute paths to image and masks."""

    case_id: str
    label: int
    image: Path
    manual_mask: Path
    annotator_mask: Path | None = None
    metadata: dict = field(default_factory=dict, compare=False)


def read_manifest_table(cohort_dir: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` as strings (no type coercion), checking the required columns."""
    cohort_dir = Path(cohort_dir)
    path = cohort_dir / MANIFEST_NAME
    if not cohort_dir.is_dir():
        raise ManifestError(f"cohort folder not found: {cohort_dir}")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (expected columns {','.join(REQUIRED_COLUMNS)})")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from exc
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    for col in table.columns:
        table[col] = table[col].str.strip()
    return table


def read_manifest(cohort_dir: str | Path) -> list[Case]:
    """Parse the manifest into :class:`Case` objects.

    Raises ManifestError for structural problems that make the cohort unusable (missing
    columns, empty or duplicate ids, labels outside {0, 1}); file-level checks belong to
    :mod:`bonemet.validation`.
    """
    cohort_dir = Path(cohort_dir)
    table = read_manifest_table(cohort_dir)
    problems: list[str] = []
    if table.empty:
        raise ManifestError(f"{cohort_dir / MANIFEST_NAME}: manifest has no cases")
    dup = table["case_id"][table["case_id"].duplicated(keep=False)]
    for case_id in sorted(set(dup)):
        problems.append(f"case '{case_id}': duplicate case_id ({int((dup == case_id).sum())} rows)")
    cases: list[Case] = []
    extra = [c for c in table.columns if c not in REQUIRED_COLUMNS + OPTIONAL_PATH_COLUMNS]
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
        annot = row.get("annotator_mask") or None
        cases.append(
            Case(
                case_id=case_id,
                label=int(row["label"]),
                image=cohort_dir / row["image"],
                manual_mask=cohort_dir / row["mask"],
                annotator_mask=(cohort_dir / annot) if annot else None,
                metadata={k: row[k] for k in extra},
            )
        )
    if problems:
        raise ManifestError(f"{cohort_dir / MANIFEST_NAME}: " + "; ".join(problems))
    return cases
