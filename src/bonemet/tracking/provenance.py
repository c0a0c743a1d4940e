"""Where a run came from: the git commit, the cohort's DVC hash and the DVC experiment, as run tags."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from bonemet.tracking.base import DatasetInput
from bonemet.tracking.dvc import data_md5, experiment_name


def git_commit() -> str:
    """The current git commit (with ``-dirty`` when the tree has tracked changes), or 'unknown'."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cohort_dir: str | Path) -> dict[str, str]:
    """Tags put on every MLflow run: git commit, the cohort's data hash and the DVC experiment name."""
    tags = {"git_commit": git_commit(), "data_md5": data_md5(cohort_dir)}
    exp = experiment_name()
    if exp:
        tags["dvc_exp"] = exp
    return tags


def cohort_dataset(cases: Sequence, cohort_dir: str | Path, context: str) -> DatasetInput:
    """The cohort as an MLflow dataset: one row per case (id, label, patient and site when the
    manifest has them; the ids as given, pseudonymous when the cases are; no file paths, which may
    carry ids), its manifest as the source, its DVC md5 as the digest, its case count."""
    import pandas as pd

    from bonemet.data.manifest import MANIFEST_NAME

    table = pd.DataFrame({"case_id": [c.case_id for c in cases], "label": [int(c.label) for c in cases]})
    if any(c.patient_id for c in cases):
        table["patient_id"] = [c.patient_id or "" for c in cases]
    if any(c.site for c in cases):
        table["site"] = [c.site or "" for c in cases]
    digest = data_md5(cohort_dir)
    return DatasetInput(name="cohort", table=table, source=str(Path(cohort_dir) / MANIFEST_NAME),
                        digest=digest, context=context,
                        tags={"dvc_md5": digest, "n_cases": str(len(table)), "cohort_dir": str(cohort_dir)})


def feature_datasets(features_dir: str | Path, sources: Sequence[str], context: str) -> list[DatasetInput]:
    """The feature tables (``<source>.parquet``) that exist, as MLflow datasets (digest: the file's md5)."""
    import pandas as pd

    from bonemet.utils import file_md5

    out = []
    for source in sources:
        path = Path(features_dir) / f"{source}.parquet"
        if path.is_file():
            table = pd.read_parquet(path)
            out.append(DatasetInput(name=f"features-{source}", table=table, source=str(path), digest=file_md5(path),
                                    context=context, tags={"n_cases": str(len(table)), "mask_source": source,
                                                           "n_columns": str(table.shape[1])}))
    return out


def segmentation_bias_tags(metrics_path: str | Path, max_dice_gap: float) -> dict[str, str]:
    """The segmentation's Dice gap between the labels (label 1 minus label 0, the ``bias`` of the
    segment stage's metrics file ``metrics_path``) as run tags, for the stages whose models learn
    from automatic-mask features: a reader sees beside each model and the registry's decision when
    those features may carry the segmenter's class-dependent error. Empty when unknown."""
    import json

    try:
        bias = json.loads(Path(metrics_path).read_text(encoding="utf-8")).get("bias") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    gap = bias.get("label_dice_gap")
    if gap is None:
        return {}
    return {"segmentation_label_dice_gap": f"{float(gap):+.4f}",
            "segmentation_bias": "over segment.bias.max_dice_gap" if abs(float(gap)) > max_dice_gap else "within limit"}
