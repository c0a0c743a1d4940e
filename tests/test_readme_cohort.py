"""The README's bring-your-own section works as written: its manifest example (every mask format,
patient_id and site) is built from synthetic cases and validates; its params snippets are valid."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd
import SimpleITK as sitk
import yaml

from bonemet.config import build_specs, deep_merge, load_params
from bonemet.data.dicom_masks import write_rtstruct, write_seg
from bonemet.data.dicom_series import write_dicom_series
from bonemet.data.io import read_image, read_mask, write_image
from bonemet.data.manifest import read_manifest
from bonemet.data.synthetic import generate_cohort

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
SECTION = README[README.index("## Bring your own data"):README.index("## Tracking, registry, serving")]


def _block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", SECTION, flags=re.S)
    return next(b for b in blocks if containing in b)


def test_the_readme_manifest_validates(tmp_path, params):
    from bonemet.validation.cohort import validate_cohort

    manifest = pd.read_csv(io.StringIO(_block("csv", "case_id")), dtype=str, keep_default_na=False)
    assert {"roi", "segment", "patient_id", "site"} <= set(manifest.columns)
    source = tmp_path / "synthetic"
    generate_cohort(source, n_cases=len(manifest), n_positive=2, seed=3, size="small", mask_label=1, overwrite=True,
                    show_progress=False)
    cohort = tmp_path / "my_cohort"
    for row, case in zip(manifest.to_dict("records"), read_manifest(source), strict=True):
        image, mask = read_image(case.image), read_mask(case.manual_mask, label=params.data.mask_label)
        image_path, mask_path = cohort / row["image"], cohort / row["mask"]
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        if image_path.suffix in (".gz", ".nrrd"):
            write_image(image, image_path)
        else:  # a DICOM series folder
            write_dicom_series(image, image_path)
            mask.CopyInformation(read_image(image_path))
        if mask_path.name.endswith("_rtstruct.dcm"):
            write_rtstruct(mask, image_path, mask_path, row["roi"], algorithm_type="MANUAL", grid_tolerance_mm=0.01)
        elif mask_path.name.endswith("_seg.dcm"):
            write_seg(mask, image_path, mask_path, algorithm_type="MANUAL", grid_tolerance_mm=0.01)
        else:
            write_image(sitk.Cast(mask * params.data.mask_label, sitk.sitkUInt8), mask_path)
    (cohort / "manifest.csv").write_text(_block("csv", "case_id"), encoding="utf-8")
    report = validate_cohort(cohort, params.validation, mask_label=params.data.mask_label, roi=params.data.roi,
                             seg_segment=params.data.segment, pseudonym_key=None, show_progress=False)
    assert report.passed, report.to_text()
    assert sorted(set(report.measurements["mask_format"])) == ["labelmap", "rtstruct", "seg"]
    cases = read_manifest(cohort)
    assert [c.patient for c in cases] == list(manifest["patient_id"])
    assert [c.site for c in cases] == list(manifest["site"])


def test_the_readme_params_snippets_are_valid():
    base = load_params(REPO / "params.yaml")
    snippet = yaml.safe_load(_block("yaml", "cohort_dir"))
    params = build_specs(deep_merge(base, snippet))
    assert params.data.cohort_dir == "cohorts/my_cohort" and params.data.source == "user"
    assignments = re.findall(r"(?:dvc exp run|make exp ARGS=')\s*-S\s+([\w.]+=\w+)", SECTION)
    assert sorted(assignments) == ["segment.model=external", "select.harmonize.enabled=true"]
    for assignment in assignments:
        key, value = assignment.split("=")
        node: dict = {}
        leaf = node
        *parents, last = key.split(".")
        for part in parents:
            leaf = leaf.setdefault(part, {})
        leaf[last] = yaml.safe_load(value)
        build_specs(deep_merge(base, node))  # a valid experiment
