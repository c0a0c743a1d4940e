"""Splits: stratification, determinism, disjointness, coverage, errors, file round trip."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bonemet.splits import SplitError, make_splits, read_splits, write_splits


def _cohort(n_pos: int = 78, n_neg: int = 100) -> tuple[list[str], list[int]]:
    ids = [f"case{i:03d}" for i in range(n_pos + n_neg)]
    labels = [1] * n_pos + [0] * n_neg
    # Interleave so that labels are not sorted with ids.
    order = sorted(range(len(ids)), key=lambda i: (i * 37) % len(ids))
    return [ids[i] for i in order], [labels[i] for i in order]


def _split(seed: int = 42, **kw):
    ids, labels = _cohort(**kw)
    return make_splits(ids, labels, test_size=0.3, n_folds=10, seed=seed), dict(zip(ids, labels, strict=True))


def test_train_test_sizes_and_stratification():
    splits, label_of = _split()
    n = len(label_of)
    assert len(splits["test"]) == pytest.approx(0.3 * n, abs=1)
    assert set(splits["train"]).isdisjoint(splits["test"])
    assert set(splits["train"]) | set(splits["test"]) == set(label_of)
    for part in ("train", "test"):
        pos = sum(label_of[c] for c in splits[part])
        assert pos == pytest.approx(len(splits[part]) * 78 / 178, abs=1)
    assert splits["train"] == sorted(splits["train"]) and splits["test"] == sorted(splits["test"])


@pytest.mark.parametrize("key,members", [("train_folds", "train"), ("all_folds", None)])
def test_folds_cover_every_case_once_and_are_stratified(key, members):
    splits, label_of = _split()
    expected = set(splits[members]) if members else set(label_of)
    folds = splits[key]
    assert set(folds) == expected  # each case exactly once (a dict key)
    assert set(folds.values()) == set(range(10))
    total_pos = sum(label_of[c] for c in expected)
    for k in range(10):
        members_k = [c for c, f in folds.items() if f == k]
        pos = sum(label_of[c] for c in members_k)
        assert len(members_k) == pytest.approx(len(expected) / 10, abs=1)
        assert pos == pytest.approx(total_pos / 10, abs=1)


def test_deterministic_for_a_seed_and_order_independent():
    ids, labels = _cohort()
    a = make_splits(ids, labels, test_size=0.3, n_folds=10, seed=7)
    b = make_splits(list(reversed(ids)), list(reversed(labels)), test_size=0.3, n_folds=10, seed=7)
    c = make_splits(ids, labels, test_size=0.3, n_folds=10, seed=8)
    assert a == b
    assert a["test"] != c["test"]
    assert a["all_folds"] != c["all_folds"]


def test_too_few_cases_of_a_class_names_the_counts():
    ids, labels = _cohort(n_pos=6, n_neg=40)
    with pytest.raises(SplitError, match=r"class counts are \{0: 40, 1: 6\}"):
        make_splits(ids, labels, test_size=0.3, n_folds=10, seed=1)
    with pytest.raises(ValueError, match="two classes"):
        make_splits(["a", "b", "c"], [1, 1, 1], test_size=0.3, n_folds=2, seed=1)
    with pytest.raises(ValueError, match="duplicate"):
        make_splits(["a", "a"], [0, 1], test_size=0.3, n_folds=2, seed=1)


def test_small_cohort_works():
    ids, labels = _cohort(n_pos=8, n_neg=10)
    splits = make_splits(ids, labels, test_size=0.3, n_folds=3, seed=0)
    assert set(splits["train_folds"].values()) == {0, 1, 2}
    assert Counter(labels)[1] == 8


def test_write_read_round_trip_and_validation(tmp_path):
    splits, _ = _split()
    path = tmp_path / "splits.json"
    write_splits(path, splits)
    assert read_splits(path) == splits
    broken = dict(splits, test=splits["test"] + [splits["train"][0]])
    path.write_text(json.dumps(broken))
    with pytest.raises(SplitError, match="both train and test"):
        read_splits(path)
    broken = dict(splits, all_folds={k: v for k, v in list(splits["all_folds"].items())[1:]})
    path.write_text(json.dumps(broken))
    with pytest.raises(SplitError, match="all_folds"):
        read_splits(path)
    path.write_text(json.dumps({"seed": 1}))
    with pytest.raises(SplitError, match="missing key"):
        read_splits(path)


def test_split_stage_reads_manifest_and_params(tmp_path, params_file):
    import pandas as pd

    from bonemet.cli import main

    ids, labels = _cohort(n_pos=12, n_neg=15)
    cohort = tmp_path / "raw"
    cohort.mkdir()
    pd.DataFrame({"case_id": ids, "label": labels, "image": "x.nii.gz", "mask": "y.nii.gz"}).to_csv(
        cohort / "manifest.csv", index=False
    )
    out = tmp_path / "splits.json"
    path = params_file({
        "seed": 3,
        "data": {"cohort_dir": str(cohort)},
        "split": {"test_size": 0.3, "n_folds": 3, "out": str(out)},
    })
    assert main(["split", "--params", str(path)]) == 0
    splits = read_splits(out)
    assert splits == make_splits(ids, labels, test_size=0.3, n_folds=3, seed=3)


def test_split_stage_refuses_a_misspelt_params_key(tmp_path, params_file, caplog):
    from bonemet.cli import main

    out = tmp_path / "splits.json"
    path = params_file({"split": {"n_fold": 3, "out": str(out)}})
    assert main(["split", "--params", str(path)]) == 2  # a params error, before anything is read or written
    assert "split.n_fold: unknown key; did you mean n_folds?" in caplog.text
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The study's split is pinned; patients (patient_id) keep their cases on one side of every split

#: md5 of the default cohort's splits (params: 178 cases, 78 positive, cohort seed 20240638,
#: split seed 42, 30 % test, 10 folds), as committed before patient grouping existed.
STUDY_SPLIT_MD5 = "5aa974563c864e21d200889643d018b2"


def test_the_study_split_does_not_move():
    """Without patient_id the splits are exactly the ungrouped ones: same seed, same ids."""
    import hashlib

    from bonemet.data.synthetic_latents import case_id, case_labels

    labels = case_labels(178, 78, 20240638)
    ids = [case_id(i) for i in range(178)]
    splits = make_splits(ids, labels.tolist(), test_size=0.3, n_folds=10, seed=42)
    assert "groups" not in splits
    assert hashlib.md5(json.dumps(splits, sort_keys=True).encode()).hexdigest() == STUDY_SPLIT_MD5
    assert splits["test"][:4] == ["case_000", "case_005", "case_006", "case_007"]
    # groups=None and one patient per case are different calls: the second is grouped (and may differ)
    assert make_splits(ids, labels.tolist(), test_size=0.3, n_folds=10, seed=42, groups=None) == splits


def _sides(splits) -> list[dict[str, object]]:
    """Every split as a case -> side mapping: train/test, each fold of train, each fold over all."""
    out = [{**{c: "train" for c in splits["train"]}, **{c: "test" for c in splits["test"]}}]
    return out + [splits["train_folds"], splits["all_folds"]]


def _assert_patients_whole(splits, patient_of):
    from bonemet.splits import patients_on_both_sides

    for sides in _sides(splits):
        per_patient: dict[str, set] = {}
        for case, side in sides.items():
            per_patient.setdefault(patient_of[case], set()).add(side)
        assert all(len(s) == 1 for s in per_patient.values()), per_patient
    assert patients_on_both_sides(splits) == []


@st.composite
def _cohorts(draw):
    """A random cohort: 1-4 lesions per patient, labels per lesion (a patient may have both)."""
    n_patients = draw(st.integers(min_value=24, max_value=60))
    sizes = draw(st.lists(st.integers(min_value=1, max_value=4), min_size=n_patients, max_size=n_patients))
    ids, labels, patients = [], [], []
    for p, size in enumerate(sizes):
        base = draw(st.integers(min_value=0, max_value=1))
        for k in range(size):
            ids.append(f"p{p:02d}_l{k}")
            labels.append(base if draw(st.integers(0, 9)) else 1 - base)
            patients.append(f"patient{p:02d}")
    assume(len(set(labels)) == 2 and min(Counter(labels).values()) >= 8)
    return ids, labels, patients


@settings(max_examples=30, deadline=None)
@given(cohort=_cohorts(), seed=st.integers(min_value=0, max_value=10_000),
       test_size=st.sampled_from([0.2, 0.25, 0.3, 0.4]), n_folds=st.integers(min_value=2, max_value=5))
def test_no_patient_is_ever_on_both_sides_of_any_split(cohort, seed, test_size, n_folds):
    ids, labels, patients = cohort
    splits = make_splits(ids, labels, test_size=test_size, n_folds=n_folds, seed=seed, groups=patients)
    patient_of = dict(zip(ids, patients, strict=True))
    assert splits["groups"] == dict(sorted(patient_of.items()))
    assert set(splits["train"]) | set(splits["test"]) == set(ids)
    assert set(splits["train"]).isdisjoint(splits["test"])
    _assert_patients_whole(splits, patient_of)
    # the test fraction is approximately kept (whole patients of up to 4 lesions move together)
    assert abs(len(splits["test"]) / len(ids) - test_size) < 0.15
    # the same inputs in another order give the same splits
    order = list(reversed(range(len(ids))))
    again = make_splits([ids[i] for i in order], [labels[i] for i in order], test_size=test_size,
                        n_folds=n_folds, seed=seed, groups=[patients[i] for i in order])
    assert again == splits


def test_grouped_splits_are_stratified_and_validated(tmp_path):
    ids, labels = _cohort()
    patients = [f"pt{i // 2:03d}" for i in range(len(ids))]  # two lesions per patient
    splits = make_splits(ids, labels, test_size=0.3, n_folds=10, seed=42, groups=patients)
    label_of = dict(zip(ids, labels, strict=True))
    assert len(splits["test"]) == pytest.approx(0.3 * len(ids), abs=4)
    positives = sum(label_of[c] for c in splits["test"]) / len(splits["test"])
    assert positives == pytest.approx(78 / 178, abs=0.05)
    assert set(splits["all_folds"].values()) == set(range(10))
    _assert_patients_whole(splits, dict(zip(ids, patients, strict=True)))
    path = tmp_path / "splits.json"
    write_splits(path, splits)
    assert read_splits(path) == splits
    # a splits file that puts one patient on both sides is refused, naming the patient
    moved = splits["test"][0]  # its patient's other lesion stays in the test set
    assert any(splits["groups"][c] == splits["groups"][moved] for c in splits["test"] if c != moved)
    broken = dict(splits, test=[c for c in splits["test"] if c != moved], train=sorted(splits["train"] + [moved]),
                  train_folds={**splits["train_folds"], moved: 0})
    path.write_text(json.dumps(broken))
    with pytest.raises(SplitError, match=f"patient\\(s\\) {splits['groups'][moved]} have cases on both sides"):
        read_splits(path)


def test_grouped_splits_need_enough_patients():
    ids, labels = _cohort(n_pos=20, n_neg=20)
    few = [f"pt{i % 6}" for i in range(len(ids))]
    with pytest.raises(SplitError, match="need at least 10 patients; found 6"):
        make_splits(ids, labels, test_size=0.3, n_folds=3, seed=0, groups=few)
    with pytest.raises(SplitError, match="empty patient_id"):
        make_splits(ids, labels, test_size=0.3, n_folds=3, seed=0, groups=[""] * len(ids))


def test_split_stage_groups_by_the_manifests_patient_id(tmp_path, params_file):
    import pandas as pd

    from bonemet.cli import main

    ids, labels = _cohort(n_pos=20, n_neg=24)
    patients = [f"pt{i // 3:02d}" for i in range(len(ids))]
    cohort = tmp_path / "raw"
    cohort.mkdir()
    pd.DataFrame({"case_id": ids, "label": labels, "image": "x.nii.gz", "mask": "y.nii.gz",
                  "patient_id": patients}).to_csv(cohort / "manifest.csv", index=False)
    out = tmp_path / "splits.json"
    path = params_file({"seed": 3, "data": {"cohort_dir": str(cohort)},
                        "split": {"test_size": 0.3, "n_folds": 3, "out": str(out)}})
    assert main(["split", "--params", str(path)]) == 0
    splits = read_splits(out)
    assert splits == make_splits(ids, labels, test_size=0.3, n_folds=3, seed=3, groups=patients)
    _assert_patients_whole(splits, dict(zip(ids, patients, strict=True)))


def test_segmentation_hold_out_keeps_patients_whole():
    from bonemet.segmentation.cv import split_validation

    ids = [f"c{i:02d}" for i in range(30)]
    groups = {c: f"p{i // 3}" for i, c in enumerate(ids)}
    train, val = split_validation(ids, 0.2, seed=4, groups=groups)
    assert len(val) >= 6 and set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
    assert {groups[c] for c in train}.isdisjoint({groups[c] for c in val})
    assert split_validation(ids, 0.2, seed=4) == split_validation(ids, 0.2, seed=4, groups=None)
