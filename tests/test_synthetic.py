"""The synthetic cohort: format, determinism, anatomy sanity, the latent model and its Bayes AUC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bonemet.data.manifest import read_manifest
from bonemet.data.synthetic import (
    CohortExistsError,
    SyntheticParamsError,
    bayes_auc,
    generate_cohort,
    plot_cases,
    sample_latents,
)
from bonemet.data.synthetic_latents import LATENT_NAMES, empirical_auc, single_latent_auc
from bonemet.utils import file_md5

SEED = 1234


def _md5s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_md5(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def label(params) -> int:
    """The lesion value of the mask label maps (params data.mask_label)."""
    return params.data.mask_label


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory, label) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cohort") / "raw"
    summary = generate_cohort(out, n_cases=8, n_positive=3, seed=SEED, size="small", mask_label=label,
                              show_progress=False)
    return out, summary


def test_same_seed_gives_byte_identical_files(small_cohort, tmp_path, label):
    out, _ = small_cohort
    again = tmp_path / "again"
    generate_cohort(again, n_cases=8, n_positive=3, seed=SEED, size="small", mask_label=label, show_progress=False)
    first, second = _md5s(out), _md5s(again)
    assert len(first) == 8 * 3 + 2
    assert first == second


def test_other_seed_gives_other_images(small_cohort, tmp_path, label):
    out, _ = small_cohort
    other = tmp_path / "other"
    generate_cohort(other, n_cases=8, n_positive=3, seed=SEED + 1, size="small", mask_label=label, show_progress=False)
    a, b = _md5s(out), _md5s(other)
    assert all(a[f"images/case_{i:03d}.nii.gz"] != b[f"images/case_{i:03d}.nii.gz"] for i in range(8))


def test_a_case_does_not_depend_on_the_cohort_size(small_cohort, tmp_path, label):
    out, _ = small_cohort
    fewer = tmp_path / "fewer"
    generate_cohort(fewer, n_cases=3, n_positive=1, seed=SEED, size="small", mask_label=label, show_progress=False)
    # labels are re-drawn for another cohort size, so compare a case whose label agrees
    labels_big = {c.case_id: c.label for c in read_manifest(out)}
    compared = 0
    for case in read_manifest(fewer):
        if labels_big[case.case_id] == case.label:
            assert file_md5(case.image) == file_md5(out / "images" / f"{case.case_id}.nii.gz")
            compared += 1
    assert compared >= 1


def test_manifest_format_and_class_counts(small_cohort):
    out, summary = small_cohort
    cases = read_manifest(out)
    assert [c.case_id for c in cases] == [f"case_{i:03d}" for i in range(8)]
    assert sum(c.label for c in cases) == 3 == summary["n_positive"]
    for case in cases:
        assert case.image.is_file() and case.manual_mask.is_file() and case.annotator_mask.is_file()
        assert {"spacing_x_mm", "spacing_y_mm", "spacing_z_mm"} <= set(case.metadata)


def test_images_are_int16_ct_and_masks_binary_inside_bone(small_cohort):
    out, _ = small_cohort
    for case in read_manifest(out):
        image = sitk.ReadImage(str(case.image))
        assert image.GetPixelID() == sitk.sitkInt16
        hu = sitk.GetArrayFromImage(image)
        assert hu.min() >= -1024 and hu.max() <= 3071
        assert hu.min() < -800, "air (bowel gas) expected"
        assert hu.max() > 700, "cortical bone expected"
        assert max(image.GetSize()) <= 40, "small volumes are ~32^3"
        mask_img = sitk.ReadImage(str(case.manual_mask))
        assert mask_img.GetPixelID() == sitk.sitkUInt8
        assert mask_img.GetSize() == image.GetSize() and mask_img.GetSpacing() == image.GetSpacing()
        mask = sitk.GetArrayFromImage(mask_img)
        assert set(np.unique(mask)) == {0, 1}
        lesion = mask.astype(bool)
        # the voxels around the lesion are bone (trabecular or cortical), not soft tissue or fat
        from scipy import ndimage

        ring = ndimage.binary_dilation(lesion, iterations=1) & ~lesion
        assert np.mean(hu[ring] > 90) > 0.6, case.case_id


def test_annotator_mask_differs_realistically(small_cohort):
    out, summary = small_cohort
    dices = []
    for case in read_manifest(out):
        manual = _array(case.manual_mask).astype(bool)
        annot = _array(case.annotator_mask).astype(bool)
        assert annot.any()
        dices.append(2 * (manual & annot).sum() / (manual.sum() + annot.sum()))
    assert 0.75 < np.mean(dices) < 0.98
    assert min(dices) > 0.6
    assert summary["dice_annotator_mean"] == pytest.approx(np.mean(dices), abs=1e-5)


def test_full_size_spacing_and_volume(tmp_path, label):
    out = tmp_path / "full"
    generate_cohort(out, n_cases=2, n_positive=1, seed=SEED, size="full", mask_label=label, show_progress=False)
    for case in read_manifest(out):
        image = sitk.ReadImage(str(case.image))
        sx, sy, sz = image.GetSpacing()
        assert 0.6 <= sx == sy <= 1.0
        assert 1.0 <= sz <= 3.0
        assert np.prod(image.GetSize()) < 1.2e6
        nx, ny, nz = image.GetSize()
        assert 75 <= nx * sx <= 85 and 55 <= nz * sz <= 65
        mask = _array(case.manual_mask)
        volume_ml = mask.astype(bool).sum() * sx * sy * sz / 1000
        assert 0.2 < volume_ml < 10


def test_mask_label_is_written(tmp_path):
    out = tmp_path / "label2"
    generate_cohort(out, n_cases=2, n_positive=1, seed=SEED, size="small", mask_label=2, show_progress=False)
    for case in read_manifest(out):
        assert set(np.unique(_array(case.manual_mask))) == {0, 2}
        assert set(np.unique(_array(case.annotator_mask))) == {0, 2}


def test_cohort_json_records_latents_and_bayes_auc(small_cohort):
    out, summary = small_cohort
    doc = json.loads((out / "cohort.json").read_text())
    assert 0.8 < doc["bayes_auc"] < 0.97
    assert doc["bayes_auc"] == pytest.approx(bayes_auc(), abs=1e-6)
    assert 0.0 <= doc["realised_llr_auc"] <= 1.0
    expected = sample_latents(8, 3, SEED, size="small")
    assert [c["case_id"] for c in doc["cases"]] == [p.case_id for p in expected]
    for record, params in zip(doc["cases"], expected, strict=True):
        assert record["label"] == params.label
        for name in LATENT_NAMES:
            assert record["latents"][name] == pytest.approx(getattr(params, name), abs=1e-5)


def test_bayes_auc_matches_monte_carlo_and_beats_every_single_latent():
    params = sample_latents(4000, 1750, seed=7, size="full")
    labels = np.array([p.label for p in params])
    llr = np.array([p.llr for p in params])
    ceiling = bayes_auc()
    assert 0.8 < ceiling < 0.97
    assert empirical_auc(llr, labels) == pytest.approx(ceiling, abs=0.02)
    for name in LATENT_NAMES:
        values = np.array([getattr(p, name) for p in params])
        auc = max(empirical_auc(values, labels), 1 - empirical_auc(values, labels))
        assert auc < ceiling - 0.08, name
        assert auc == pytest.approx(single_latent_auc()[name], abs=0.025)


def test_lesion_size_is_independent_of_label():
    params = sample_latents(3000, 1300, seed=11, size="full")
    labels = np.array([p.label for p in params], dtype=float)
    radius = np.array([p.radius_mm for p in params])
    assert abs(np.corrcoef(labels, radius)[0, 1]) < 0.06
    auc = empirical_auc(radius, labels)
    assert 0.45 < auc < 0.55


def test_bad_arguments_are_refused(tmp_path, small_cohort, label):
    common = {"seed": SEED, "mask_label": label}
    with pytest.raises(SyntheticParamsError, match="n_positive"):
        generate_cohort(tmp_path / "a", n_cases=4, n_positive=4, size="small", **common)
    with pytest.raises(SyntheticParamsError, match="size"):
        generate_cohort(tmp_path / "b", n_cases=4, n_positive=2, size="huge", **common)
    assert not (tmp_path / "b").exists()
    with pytest.raises(SyntheticParamsError, match="mask_label"):
        generate_cohort(tmp_path / "c", n_cases=4, n_positive=2, size="small", seed=SEED, mask_label=256)
    assert not (tmp_path / "c").exists()
    out, _ = small_cohort
    with pytest.raises(CohortExistsError, match="not empty"):
        generate_cohort(out, n_cases=4, n_positive=2, size="small", **common)


def test_plot_cases_writes_a_png(small_cohort, tmp_path):
    out, _ = small_cohort
    path = plot_cases(out, ["case_000", "case_001"], tmp_path / "fig.png", mask_label=1, grid_tolerance_mm=0.01)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def synth_params(params_file):
    """``(cohort_dir, source) -> path`` of the repository's params with a 4-case small synthetic cohort."""

    def write(cohort_dir: Path, source: str) -> Path:
        return params_file({
            "seed": 1,
            "data": {
                "cohort_dir": str(cohort_dir),
                "source": source,
                "mask_label": 1,
                "synthetic": {"n_cases": 4, "n_positive": 1, "seed": SEED, "size": "small"},
            },
        })

    return write


def test_synth_command_refuses_non_empty_out_unless_forced(tmp_path, synth_params):
    from bonemet.cli import main

    params = synth_params(tmp_path / "unused", "synthetic")
    out = tmp_path / "cohort"
    args = ["synth", "--params", str(params), str(out), "--small", "--no-progress"]
    assert main(args) == 0
    assert len(read_manifest(out)) == 4
    before = _md5s(out)
    assert main(args + ["--n", "5"]) == 1
    assert _md5s(out) == before
    assert main(args + ["--n", "5", "--force"]) == 0
    assert len(read_manifest(out)) == 5
    # impossible counts are the user's mistake: one line, exit 1, the cohort kept
    before = _md5s(out)
    assert main(args + ["--n", "4", "--n-positive", "4", "--force"]) == 1
    assert _md5s(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cohort")], "temporary folder left behind"


def test_synth_command_writes_the_figure_outside_the_cohort(tmp_path, synth_params):
    from bonemet.cli import main

    params = synth_params(tmp_path / "unused", "synthetic")
    out = tmp_path / "cohort"
    figure = tmp_path / "figs" / "cases.png"
    assert main(["synth", "--params", str(params), str(out), "--small", "--no-progress", "--figure", str(figure)]) == 0
    assert len(read_manifest(out)) == 4
    assert figure.is_file() and not list(out.glob("*.png"))


def test_ensure_data_generates_once_then_does_nothing(tmp_path, synth_params):
    from bonemet.cli import main

    cohort = tmp_path / "data" / "raw"
    params = synth_params(cohort, "synthetic")
    assert main(["ensure-data", "--params", str(params), "--no-progress"]) == 0
    before = _md5s(cohort)
    assert len(read_manifest(cohort)) == 4
    assert main(["ensure-data", "--params", str(params), "--no-progress"]) == 0
    assert _md5s(cohort) == before


def test_synthetic_params_refuse_a_cohort_too_small_to_split(tmp_path, params_file, caplog):
    from bonemet.cli import main

    cohort = tmp_path / "raw"
    path = params_file({"data": {"cohort_dir": str(cohort), "synthetic": {"n_cases": 3, "n_positive": 1}}})
    assert main(["ensure-data", "--params", str(path), "--no-progress"]) == 2
    assert "data.synthetic.n_cases" in caplog.text and "found 3" in caplog.text
    assert not cohort.exists()


def test_ensure_data_with_user_source_and_no_cohort_fails_clearly(tmp_path, caplog, synth_params):
    from bonemet.cli import main

    cohort = tmp_path / "mine"
    params = synth_params(cohort, "user")
    assert main(["ensure-data", "--params", str(params)]) == 1
    assert "dvc pull" in caplog.text and str(cohort) in caplog.text
    assert not cohort.exists()


def test_synth_counts_follow_params_unless_overridden():
    from bonemet.data.synthetic import case_counts

    assert case_counts(None, None, 178, 78) == (178, 78)
    assert case_counts(10, None, 178, 78) == (10, 4)  # the params' class ratio
    assert case_counts(2, None, 178, 78) == (2, 1)
    assert case_counts(10, 7, 178, 78) == (10, 7)


def test_ensure_data_never_overwrites_a_folder_without_manifest(tmp_path, synth_params):
    from bonemet.cli import main

    cohort = tmp_path / "raw"
    cohort.mkdir()
    (cohort / "notes.txt").write_text("mine")
    params = synth_params(cohort, "synthetic")
    assert main(["ensure-data", "--params", str(params), "--no-progress"]) == 1
    assert [p.name for p in cohort.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------------------------
# Sites: a protocol per site (params data.synthetic.protocols), `bonemet synth --sites 2`


def test_two_sites_with_the_second_protocol(tmp_path, params, label):
    protocols = params.data.synthetic.protocols[:2]
    site_a, site_b = protocols
    one = tmp_path / "one"
    two = tmp_path / "two"
    generate_cohort(one, n_cases=4, n_positive=2, seed=SEED, size="small", mask_label=label, show_progress=False)
    summary = generate_cohort(two, n_cases=4, n_positive=2, seed=SEED, size="small", mask_label=label,
                              protocols=protocols, show_progress=False)
    cases = read_manifest(two)
    assert [c.site for c in cases] == ["site_a", "site_b", "site_a", "site_b"]
    assert read_manifest(one)[0].site is None and "site" not in (one / "manifest.csv").read_text()
    assert [s["name"] for s in summary["sites"]] == ["site_a", "site_b"]
    # site_a is the cohort's own scanner: the very same files as the single-site cohort
    for cid in ("case_000", "case_002"):
        for sub in ("images", "masks", "annotator_masks"):
            assert file_md5(two / sub / f"{cid}.nii.gz") == file_md5(one / sub / f"{cid}.nii.gz")
    # site_b: the protocol's noise, kernel, offset and slice thickness, recorded per case
    before = {c["case_id"]: c for c in json.loads((one / "cohort.json").read_text())["cases"]}
    after = {c["case_id"]: c for c in json.loads((two / "cohort.json").read_text())["cases"]}
    for cid in ("case_001", "case_003"):
        a, b = before[cid], after[cid]
        assert b["site"] == "site_b"
        assert b["noise_sd_hu"] == pytest.approx(a["noise_sd_hu"] * site_b.noise_scale, abs=1e-5)
        assert b["blur_sd_mm"] == pytest.approx(a["blur_sd_mm"] * site_b.blur_scale, abs=1e-5)
        assert b["hu_offset"] == pytest.approx(a["hu_offset"] + site_b.hu_offset, abs=1e-5)
        low, high = site_b.slice_thickness_mm
        assert low <= b["spacing_mm"][2] <= high and b["spacing_mm"][:2] == a["spacing_mm"][:2]
        assert b["density"] == a["density"] and b["label"] == a["label"]  # the lesion itself is the same
        image_a, image_b = _array(one / "images" / f"{cid}.nii.gz"), _array(two / "images" / f"{cid}.nii.gz")
        corner_a, corner_b = image_a[:, :4, :4].astype(float), image_b[:, :4, :4].astype(float)  # fat
        assert corner_b.mean() - corner_a.mean() == pytest.approx(site_b.hu_offset, abs=12)
        assert corner_b.std() > 1.4 * corner_a.std()
    assert site_a.noise_scale == 1 and site_a.slice_thickness_mm is None


def test_synth_command_sites(tmp_path, synth_params, caplog):
    from bonemet.cli import main

    params = synth_params(tmp_path / "unused", "synthetic")
    out = tmp_path / "cohort"
    assert main(["synth", "--params", str(params), str(out), "--small", "--no-progress", "--sites", "2"]) == 0
    assert {c.site for c in read_manifest(out)} == {"site_a", "site_b"}
    assert main(["synth", "--params", str(params), str(tmp_path / "three"), "--small", "--sites", "3"]) == 1
    assert "describes 2 site(s)" in caplog.text


def _dvc_repo(path: Path) -> Path:
    import subprocess
    import sys

    path.mkdir(parents=True, exist_ok=True)
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=path, check=True)
    subprocess.run([dvc, "config", "core.analytics", "false"], cwd=path, check=True)
    (path / ".gitignore").write_text("/data/*\n!/data/.gitkeep\n")
    return path


def test_ensure_data_versions_a_cohort_outside_data_raw(tmp_path, synth_params, monkeypatch, caplog):
    """cohort_dir elsewhere: `dvc add` once (cohorts/x.dvc), then a regenerated cohort must match it."""
    import subprocess
    import sys

    from bonemet.cli import main
    from bonemet.tracking.dvc import cohort_dvc_file, data_md5

    caplog.set_level("INFO")
    repo = _dvc_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    params = synth_params(Path("cohorts/mine"), "synthetic")
    assert main(["ensure-data", "--params", str(params), "--no-progress"]) == 0
    dvc_file = Path("cohorts/mine.dvc")
    assert dvc_file.is_file() and cohort_dvc_file("cohorts/mine") == dvc_file
    assert "/mine" in Path("cohorts/.gitignore").read_text()
    recorded = data_md5("cohorts/mine")
    assert recorded.endswith(".dir")
    dvc = str(Path(sys.executable).with_name("dvc"))
    status = subprocess.run([dvc, "status", str(dvc_file)], capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout
    # the folder deleted: regenerated byte-identical and committed to the cache, the .dvc file unchanged
    before = dvc_file.read_text()
    subprocess.run(["rm", "-rf", "cohorts/mine"], check=True)
    assert main(["ensure-data", "--params", str(params), "--no-progress"]) == 0
    assert dvc_file.read_text() == before and "matches cohorts/mine.dvc" in caplog.text
    # regenerated with another seed: not what the .dvc file records, so the run stops
    subprocess.run(["rm", "-rf", "cohorts/mine"], check=True)
    other = synth_params(Path("cohorts/mine"), "synthetic")
    text = other.read_text().replace(f"seed: {SEED}", "seed: 99")
    other.write_text(text)
    assert main(["ensure-data", "--params", str(other), "--no-progress"]) == 1
    assert "differs from what cohorts/mine.dvc records" in caplog.text


def test_ensure_data_explains_a_git_ignored_cohort_folder(tmp_path, synth_params, monkeypatch, caplog):
    from bonemet.cli import main

    repo = _dvc_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    params = synth_params(Path("data/mine"), "synthetic")
    assert main(["ensure-data", "--params", str(params), "--no-progress"]) == 1
    assert "data/mine.dvc would be ignored by git" in caplog.text and "cohorts/mine" in caplog.text
