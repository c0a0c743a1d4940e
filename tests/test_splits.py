"""Splits: stratification, determinism, disjointness, coverage, errors, file round trip."""

from __future__ import annotations

import json
from collections import Counter

import pytest

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
