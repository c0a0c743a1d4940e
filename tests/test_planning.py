"""The plan stage: fingerprint, deterministic plan, explicit values win, bad input, the stages reading it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bonemet.config import AUTO, PLANNED_KEYS, ParamsError, PlanRequiredError, load_specs, setting
from bonemet.data.manifest import read_manifest
from bonemet.planning import (
    NonCTIntensityError,
    PlanInputs,
    PlanMismatchError,
    apply_values,
    fingerprint_cohort,
    make_plan,
    planned_params,
    resolve_params,
)
from bonemet.planning.fingerprint import CaseFingerprint, CohortFingerprint

REPO = Path(__file__).resolve().parents[1]
#: every planned setting left to the plan (params.yaml's top level and every profile)
ALL_AUTO = {
    "preprocess": {"target_spacing_mm": AUTO, "hu_window": AUTO, "crop": {"min_size_vox": AUTO}},
    "segment": {"roi_size": AUTO, "train": {"batch_size": AUTO},
                "profiles": {p: {"roi_size": AUTO, "train": {"batch_size": AUTO, "max_steps": None}}
                             for p in ("cpu", "paper")}},
}
#: the cpu profile's step budget planned too
STEPS_AUTO = {"segment": {"profiles": {"cpu": {"train": {"max_steps": AUTO}}}}}


def _case(root: Path, case_id: str, *, spacing=(1.0, 1.0, 1.0), radius_mm=6.0, hu_scale=1.0, seed=0) -> dict:
    """A 60 x 60 x 60 mm CT (soft tissue, a bone block of 700 HU, a 1100 HU sphere lesion in it) and its mask."""
    size = [int(round(60 / s)) for s in spacing]
    rng = np.random.default_rng(seed)
    arr = rng.normal(40, 15, size[::-1])
    z, y, x = np.indices(size[::-1]).astype(float)
    coords = [(g + 0.5) * s - 30.0 for g, s in zip((x, y, z), spacing, strict=True)]
    bone = np.all([np.abs(c) < 18 for c in coords], axis=0)
    arr[bone] = 700 + rng.normal(0, 30, int(bone.sum()))
    lesion = sum(c**2 for c in coords) <= radius_mm**2
    arr[lesion] = 1100 + rng.normal(0, 40, int(lesion.sum()))
    image = sitk.GetImageFromArray((arr * hu_scale).astype(np.float32 if hu_scale != 1 else np.int16))
    image.SetSpacing(spacing)
    mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
    mask.CopyInformation(image)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    sitk.WriteImage(image, str(root / "images" / f"{case_id}.nii.gz"))
    sitk.WriteImage(mask, str(root / "masks" / f"{case_id}.nii.gz"))
    return {"case_id": case_id, "image": f"images/{case_id}.nii.gz", "mask": f"masks/{case_id}.nii.gz"}


def _cohort(root: Path, cases: dict[str, dict]) -> Path:
    rows = [_case(root, cid, seed=i, **kw) for i, (cid, kw) in enumerate(cases.items())]
    lines = ["case_id,label,image,mask"] + [f"{r['case_id']},{i % 2},{r['image']},{r['mask']}" for i, r in enumerate(rows)]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan_cohort")
    return _cohort(root, {f"c{i}": {"spacing": (1.0, 1.0, 2.0 if i % 2 else 1.5), "radius_mm": 5.0 + i}
                          for i in range(4)})


def _auto_params(params_file, extra=None):
    from bonemet.config import deep_merge

    return load_specs(params_file(deep_merge(ALL_AUTO, extra or {})))


def _fingerprint(cohort_dir: Path, params, n_jobs: int = 1) -> CohortFingerprint:
    cases = read_manifest(cohort_dir, roi=None, seg_segment=None)
    return fingerprint_cohort(cases, mask_label=params.data.mask_label, grid_tolerance_mm=params.validation.grid_tolerance_mm,
                              crop=params.preprocess.crop, samples_per_case=params.plan.samples_per_case, n_jobs=n_jobs)


def test_fingerprint_measures_the_cohort(cohort, params_file):
    params = _auto_params(params_file)
    fp = _fingerprint(cohort, params)
    assert [c.case_id for c in fp.cases] == ["c0", "c1", "c2", "c3"]
    c0, c3 = fp.cases[0], fp.cases[3]
    assert c0.spacing_mm == (1.0, 1.0, 1.5) and fp.cases[1].spacing_mm == (1.0, 1.0, 2.0)
    assert c0.size_vox == (60, 60, 40)
    assert 9.0 <= c0.lesion_max_extent_mm <= 11.0 and 15.0 <= c3.lesion_max_extent_mm <= 17.0  # diameters 10, 16 mm
    assert c0.lesion_hu_median == pytest.approx(1100, abs=20)
    assert 0 < c0.lesion_fraction_image < c0.lesion_fraction_bone_box < 1
    summary = fp.summary()
    assert summary["spacing_mm"]["z"]["p50"] == pytest.approx(1.75)
    assert summary["hu_lesion"]["p50"] == pytest.approx(1100, abs=20)
    assert summary["hu_bone_region"]["p50"] < summary["hu_lesion"]["p50"]


def test_the_same_cohort_gives_the_same_plan(cohort, params_file):
    params = _auto_params(params_file, STEPS_AUTO)
    one = make_plan(_fingerprint(cohort, params, n_jobs=1), PlanInputs.from_params(params))
    two = make_plan(_fingerprint(cohort, params, n_jobs=2), PlanInputs.from_params(params))
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    values = {k: v["value"] for k, v in one["values"].items()}
    assert all(v["source"] == "plan" and v["planned"] == v["value"] for v in one["values"].values())
    # the crop covers the field of view (context_factor x the typical lesion) at the planned spacing,
    # within the cpu profile's budget, in multiples of the network's divisor, and the window holds the lesions
    details = one["details"]
    roi, spacing = np.asarray(values["segment.roi_size"]), np.asarray(values["preprocess.target_spacing_mm"])
    assert np.prod(roi) <= params.segment.plan.max_crop_voxels and np.all(roi % details["divisor"] == 0)
    assert np.all(roi[::-1] * spacing >= details["field_of_view_mm"] - 1e-6)
    assert values["preprocess.crop.min_size_vox"] == list(roi[::-1])
    lo, hi = values["preprocess.hu_window"]
    assert lo < params.preprocess.crop.bone_threshold_hu < 1100 < hi
    assert 1 <= values["segment.train.batch_size"] <= params.segment.plan.max_batch_size
    # the step budget: the profile's training voxels over one step's (batch x crops x crop voxels); its
    # epochs over a fold's training cases (4 cases, 10 folds: 3 outside the fold, 1 held out for validation)
    step_voxels = values["segment.train.batch_size"] * params.segment.train.num_samples * int(np.prod(roi))
    assert values["segment.train.max_steps"] == round(params.segment.plan.train_megavoxels * 1e6 / step_voxels)
    schedule = details["schedule"]
    assert schedule["voxels_per_step"] == step_voxels and schedule["fold_training_cases"] == 2
    assert schedule["epochs"] == params.segment.train.max_epochs  # capped: the tiny cohort's epochs are short
    assert any("more than segment.train.max_epochs" in w for w in one["warnings"])


def test_explicit_values_win_and_the_plan_records_where_each_came_from(cohort, params_file):
    params = _auto_params(params_file)
    fp = _fingerprint(cohort, params)
    auto = make_plan(fp, PlanInputs.from_params(params))
    explicit = _auto_params(params_file, {"preprocess": {"target_spacing_mm": [0.5, 0.5, 0.5], "hu_window": [-100, 1500]}})
    plan = make_plan(fp, PlanInputs.from_params(explicit))
    spacing, window = plan["values"]["preprocess.target_spacing_mm"], plan["values"]["preprocess.hu_window"]
    assert spacing == {"value": [0.5, 0.5, 0.5], "source": "params",
                       "planned": auto["values"]["preprocess.target_spacing_mm"]["value"]}
    assert window["value"] == [-100.0, 1500.0] and window["source"] == "params"
    # the crop is planned at the explicit spacing: more voxels for the same field of view (within the budget)
    assert plan["values"]["segment.roi_size"]["source"] == "plan"
    assert np.prod(plan["values"]["segment.roi_size"]["value"]) >= np.prod(auto["values"]["segment.roi_size"]["value"])
    # the stages get the explicit values where params set them, the plan's elsewhere
    resolved = resolve_params(explicit, plan)
    assert resolved.preprocess.target_spacing_mm == (0.5, 0.5, 0.5) and resolved.preprocess.hu_window == (-100, 1500)
    assert list(resolved.segment.roi_size) == plan["values"]["segment.roi_size"]["value"]
    assert resolved.segment.train.batch_size == plan["values"]["segment.train.batch_size"]["value"]


def test_the_plan_is_applied_once_and_the_library_gets_no_auto(cohort, params_file, tmp_path):
    from bonemet.config import PlannedParams, PlannedPreprocessSpec, PlannedSegmentSpec, planned_spec
    from bonemet.preprocessing import preprocess_cohort

    params = _auto_params(params_file)
    plan = make_plan(_fingerprint(cohort, params), PlanInputs.from_params(params))
    resolved = planned_params(params, plan)
    # the planned types hold values only: `auto` cannot be put back, and no planned setting is left `auto`
    assert isinstance(resolved, PlannedParams)
    assert isinstance(resolved.preprocess, PlannedPreprocessSpec) and isinstance(resolved.segment, PlannedSegmentSpec)
    assert all(setting(resolved, k) != AUTO for k in PLANNED_KEYS)
    with pytest.raises(ParamsError, match="roi_size"):
        resolved.segment.updated({"roi_size": AUTO})
    assert planned_spec(resolved, "here") is resolved  # already planned: passed through
    # a library entry point handed raw params still `auto` refuses them, naming the keys and what to run
    with pytest.raises(PlanRequiredError, match=r"preprocess.target_spacing_mm, preprocess.hu_window.*"
                                                r"reached preprocess_cohort unresolved.*bonemet plan"):
        preprocess_cohort(cohort, params.preprocess.updated({"out_dir": str(tmp_path / "pre")}), compute=params.compute,
                          mask_label=1, grid_tolerance_mm=0.01, roi=None, seg_segment=None, pseudonym_key=None)
    assert not (tmp_path / "pre").exists()
    # explicit values everywhere: no plan file is read, the raw params convert to the planned type
    explicit = apply_values(params, {k: setting(resolved, k) for k in PLANNED_KEYS})
    missing = explicit.model_copy(update={"plan": explicit.plan.updated({"out": str(tmp_path / "none.json")})})
    converted = planned_params(missing)
    assert type(converted) is PlannedParams and type(explicit) is not PlannedParams
    assert all(setting(converted, k) == setting(resolved, k) for k in PLANNED_KEYS)


def test_a_plan_made_from_other_params_is_refused(cohort, params_file, tmp_path):
    params = _auto_params(params_file)
    plan = make_plan(_fingerprint(cohort, params), PlanInputs.from_params(params))
    changed = _auto_params(params_file, {"preprocess": {"hu_window": [-100, 1500]}})
    with pytest.raises(PlanMismatchError, match=r"made from other params: explicit.preprocess.hu_window.*bonemet plan"):
        resolve_params(changed, plan)
    smaller = params.model_copy(update={"segment": params.segment.updated({"plan.max_crop_voxels": 4096})})
    with pytest.raises(PlanMismatchError, match=r"budgets.max_crop_voxels \(plan: 32768, params: 4096\)"):
        resolve_params(smaller, plan)
    missing = params.model_copy(update={"plan": params.plan.updated({"out": str(tmp_path / "none.json")})})
    with pytest.raises(PlanRequiredError, match=r"none.json: no plan.*bonemet plan"):
        planned_params(missing)


def _fp(cases: list[dict]) -> CohortFingerprint:
    """A fingerprint written by hand: spacing, lesion extent (mm) and lesion HU per case."""
    out = []
    for i, c in enumerate(cases):
        spacing = tuple(c.get("spacing", (1.0, 1.0, 1.0)))
        extent = tuple(c.get("extent", (20.0, 20.0, 20.0)))
        spread = c.get("spread", 200.0)
        hu = np.full(50, c.get("hu", 800.0), dtype=np.float32) + np.linspace(-spread / 2, spread / 2, 50,
                                                                            dtype=np.float32)
        out.append(CaseFingerprint(
            case_id=c.get("id", f"k{i}"), spacing_mm=spacing, size_vox=tuple(int(80 / s) for s in spacing),
            lesion_voxels=100, lesion_volume_ml=1.0, lesion_extent_mm=extent, lesion_hu_median=float(np.median(hu)),
            bone_box_extent_mm=(60.0, 60.0, 60.0), lesion_fraction_image=0.01, lesion_fraction_bone_box=0.02,
            lesion_hu_sample=hu, bone_hu_sample=np.concatenate([hu * 0.5, hu]), image=f"/cohort/images/{c.get('id', f'k{i}')}.nii.gz"))
    return CohortFingerprint(tuple(out))


def test_non_ct_intensities_stop_the_plan_naming_cases_and_files(params_file):
    params = _auto_params(params_file)
    fp = _fp([{"id": "ct1"}, {"id": "mr7", "hu": 0.4, "spread": 0.5}, {"id": "ct2"}, {"id": "pet3", "hu": 25000.0}])
    with pytest.raises(NonCTIntensityError) as info:
        make_plan(fp, PlanInputs.from_params(params))
    message = str(info.value)
    assert "2 of 4 case(s)" in message and "'mr7' (/cohort/images/mr7.nii.gz)" in message and "'pet3'" in message
    assert "lesion median 2.5e+04" in message and "span only" in message and "ct1" not in message
    assert "plan.lesion_hu_range" in message and "Rescale the images to HU" in message


def test_anisotropic_voxels_and_tiny_lesions_warn_naming_the_cases_and_the_crop_adapts(params_file):
    params = _auto_params(params_file)
    inputs = PlanInputs.from_params(params)
    base = make_plan(_fp([{"id": f"n{i}"} for i in range(5)]), inputs)
    assert base["warnings"] == []
    thick = make_plan(_fp([{"id": f"n{i}"} for i in range(4)] + [{"id": "thick", "spacing": (0.5, 0.5, 5.0)}]),
                      inputs)
    assert any("thick (0.5x0.5x5 mm)" in w and "crop adapted" in w and "n0" not in w for w in thick["warnings"])
    # lesions of 1.5 mm, scanned at 0.5 mm, on a grid coarsened for the crop budget: named, the
    # spacing refined towards the scans' own and the crop adapted (less context, within the budget)
    fine = {"spacing": (0.5, 0.5, 0.5)}
    tiny = make_plan(_fp([{"id": f"t{i}", "extent": (1.5, 1.5, 1.5), **fine} for i in range(3)]
                         + [{"id": "big", **fine}]), inputs)
    warning = next(w for w in tiny["warnings"] if "plan.min_lesion_voxels" in w)
    assert "t0, t1, t2" in warning and "big" not in warning and "crop adapted" in warning
    assert tiny["values"]["preprocess.target_spacing_mm"]["value"] == [0.5, 0.5, 0.5]
    assert np.prod(tiny["values"]["segment.roi_size"]["value"]) <= params.segment.plan.max_crop_voxels
    # at the scans' own resolution there is nothing to refine: the warning only names the cases
    native = make_plan(_fp([{"id": f"t{i}", "extent": (2.0, 2.0, 2.0)} for i in range(3)] + [{"id": "big"}]), inputs)
    warning = next(w for w in native["warnings"] if "plan.min_lesion_voxels" in w)
    assert "t0, t1, t2" in warning and "adapted" not in warning


def test_an_anisotropic_cohort_gets_nnunets_low_resolution_axis_rule(params_file):
    params = _auto_params(params_file)
    cases = [{"spacing": (0.5, 0.5, z)} for z in (3.0, 4.0, 5.0, 5.0, 6.0)]
    plan = make_plan(_fp(cases), PlanInputs.from_params(params))
    details = plan["details"]
    assert details["anisotropic_cohort"] is True
    assert details["base_spacing_mm"][2] == pytest.approx(np.percentile([3, 4, 5, 5, 6], params.plan.lowres_axis_percentile))
    iso = make_plan(_fp([{"spacing": (0.5, 0.5, 1.0)}] * 5), PlanInputs.from_params(params))
    assert iso["details"]["anisotropic_cohort"] is False


def test_the_batch_fits_the_memory_budget(cohort, params_file):
    fp = _fingerprint(cohort, _auto_params(params_file))
    roomy = make_plan(fp, PlanInputs.from_params(_auto_params(params_file)))
    tight = _auto_params(params_file, {"segment": {"profiles": {"cpu": {"plan": {"memory_mb": 1.0}}}}})
    plan = make_plan(fp, PlanInputs.from_params(tight))
    assert roomy["values"]["segment.train.batch_size"]["value"] == 2
    assert plan["values"]["segment.train.batch_size"]["value"] == 1
    assert any("segment.plan.memory_mb" in w for w in plan["warnings"])
    memory = roomy["details"]["memory"]
    assert memory["activation_mb_per_crop"] > 0 and memory["n_parameters"] > 0


def _bonemet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonemet", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHONUTF8": "1", "BONEMET_PROGRESS": "0",
                                            "MLFLOW_TRACKING_URI": (cwd / "mlruns").resolve().as_uri()})


@pytest.mark.slow
def test_the_plan_stage_writes_the_plan_and_preprocess_reads_it(cohort, params_file, tmp_path):
    path = params_file({**ALL_AUTO, "data": {"cohort_dir": str(cohort)},
                        "preprocess": {**ALL_AUTO["preprocess"], "out_dir": str(tmp_path / "pre"), "n_jobs": 1},
                        "plan": {"out": str(tmp_path / "plan.json"), "n_jobs": 1}})
    # without a plan the preprocess stage stops with one line naming the fix
    before = _bonemet("preprocess", "--params", str(path), cwd=tmp_path)
    assert before.returncode == 1 and "no plan" in before.stderr and "Traceback" not in before.stderr
    proc = _bonemet("plan", "--params", str(path), "--no-tracking", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "plan.json").read_text(encoding="utf-8"))
    assert set(plan["values"]) == set(PLANNED_KEYS) and plan["fingerprint"]["n_cases"] == 4
    assert "images/" not in (tmp_path / "plan.json").read_text(encoding="utf-8")  # no file paths in the plan
    assert _bonemet("preprocess", "--params", str(path), cwd=tmp_path).returncode == 0
    geometry = json.loads((tmp_path / "pre" / "c0_geometry.json").read_text(encoding="utf-8"))
    assert geometry["resampled_spacing_mm"] == pytest.approx(plan["values"]["preprocess.target_spacing_mm"]["value"])
    assert geometry["hu_window"] == plan["values"]["preprocess.hu_window"]["value"]


def test_the_plan_stage_refuses_non_ct_images_in_one_line(tmp_path, params_file):
    cohort = _cohort(tmp_path / "cohort", {"a": {}, "b": {"hu_scale": 1e-3}})
    path = params_file({**ALL_AUTO, "data": {"cohort_dir": str(cohort)}, "plan": {"out": str(tmp_path / "plan.json"),
                                                                                   "n_jobs": 1}})
    proc = _bonemet("plan", "--params", str(path), "--no-tracking", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "'b' (" in proc.stderr and "images/b.nii.gz" in proc.stderr and "CT-plausible" in proc.stderr
    assert not (tmp_path / "plan.json").exists()
