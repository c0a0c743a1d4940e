"""Stratified train/test split and cross-validation folds, written to one splits file.

``make_splits`` returns (and ``data/splits.json`` holds)::

    {"seed": int, "test_size": float, "n_folds": int,
     "train": [ids], "test": [ids],            # stratified, e.g. 70 / 30
     "train_folds": {id: k},                   # stratified n_folds within train (classifier CV)
     "all_folds": {id: k},                     # stratified n_folds over all cases (out-of-fold segmentation)
     "groups": {id: patient}}                  # only when grouped by patient (the manifest's patient_id)

Ids are sorted before splitting, so the result depends only on the set of (id, label) pairs
(and patients) and the seed, not on the manifest's row order.

Patients. A cohort may hold several lesions or CTs of one patient (the manifest's optional
``patient_id`` column). Given ``groups``, every split keeps a patient's cases together: the
train/test split, the folds in train and the folds over all cases come from scikit-learn's
``StratifiedGroupKFold`` (shuffled, seeded), which balances the classes as well as whole
patients allow. The train/test split takes ``m`` of ``d`` grouped folds as the test set, with
``m / d`` the test fraction (0.3 -> 3 of 10, the study's "7 subsets for training, 3 for
validation"; 0.4 -> 2 of 5). Without ``groups`` the splits are exactly the ungrouped ones
(``train_test_split`` then ``StratifiedKFold``): the committed split of the study's cohort
does not move.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonemet.errors import UserError
from bonemet.utils import write_json

SPLIT_KEYS = ("seed", "test_size", "n_folds", "train", "test", "train_folds", "all_folds")
#: Optional key: case id -> patient id, present when the splits are grouped by patient.
GROUPS_KEY = "groups"
# Largest number of grouped folds the train/test split may use to reach test_size (m of d folds).
_MAX_TEST_FOLDS = 20


class SplitError(UserError, ValueError):
    """Splits cannot be made, or a splits file is malformed; the message says what and where."""


def _check_counts(labels: Sequence[int], n_folds: int, what: str) -> None:
    counts = Counter(int(v) for v in labels)
    too_few = {k: v for k, v in counts.items() if v < n_folds}
    if too_few:
        raise SplitError(
            f"{what}: stratified {n_folds}-fold splitting needs at least {n_folds} cases of each class; "
            f"class counts are {dict(sorted(counts.items()))} (too few: {dict(sorted(too_few.items()))})"
        )


def _stratified_folds(
    ids: list[str], labels: list[int], n_folds: int, seed: int, what: str,
    groups: list[str] | None = None,
) -> dict[str, int]:
    """Case id -> fold: ``StratifiedKFold``, or ``StratifiedGroupKFold`` when ``groups`` are given."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    _check_counts(labels, n_folds, what)
    folds: dict[str, int] = {}
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(ids)), labels)
    else:
        _check_groups(groups, n_folds, what)
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(ids)), labels, groups)
    for k, (_, held_out) in enumerate(parts):
        for i in held_out:
            folds[ids[i]] = k
    return dict(sorted(folds.items()))


def _check_groups(groups: Sequence[str], n_folds: int, what: str) -> None:
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise SplitError(
            f"{what}: {n_folds} folds grouped by patient need at least {n_folds} patients; found {n_groups} "
            "(lower split.n_folds, or check the manifest's patient_id column)"
        )


def _test_folds(test_size: float) -> tuple[int, int]:
    """``(m, d)``: the test set is ``m`` of ``d`` grouped folds, ``d <= 20``: the smallest ``d``
    with ``m / d == test_size`` exactly, else the smallest within 0.005 of it, else the closest."""
    options = [(round(test_size * d), d) for d in range(2, _MAX_TEST_FOLDS + 1) if 1 <= round(test_size * d) < d]
    for tolerance in (1e-9, 0.005, 1.0):
        close = [(m, d) for m, d in options if abs(m / d - test_size) <= tolerance]
        if close:
            return min(close, key=lambda md: (abs(md[0] / md[1] - test_size) if tolerance == 1.0 else 0, md[1]))
    raise SplitError(f"test_size {test_size}: no m of d <= {_MAX_TEST_FOLDS} grouped folds approximates it")


def grouped_train_test(
    ids: list[str], labels: list[int], groups: list[str], *, test_size: float, seed: int
) -> tuple[list[str], list[str]]:
    """A stratified train/test split that keeps each group (patient) on one side.

    The cases are cut into ``d`` seeded ``StratifiedGroupKFold`` folds and ``m`` of them form
    the test set, with ``m / d`` as close to ``test_size`` as ``d <= 20`` allows (see
    :func:`_test_folds`); which ``m`` folds is seeded too.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    m, d = _test_folds(float(test_size))
    _check_groups(groups, d, f"train/test split with test_size {test_size} ({m} of {d} folds grouped by patient)")
    splitter = StratifiedGroupKFold(n_splits=d, shuffle=True, random_state=seed)
    held = [held_out for _, held_out in splitter.split(np.zeros(len(ids)), labels, groups)]
    chosen = np.random.default_rng(seed).choice(d, size=m, replace=False)
    test_idx = {int(i) for k in chosen for i in held[int(k)]}
    test = [ids[i] for i in range(len(ids)) if i in test_idx]
    train = [ids[i] for i in range(len(ids)) if i not in test_idx]
    return train, test


def make_splits(
    case_ids: Sequence[str], labels: Sequence[int], *, test_size: float, n_folds: int, seed: int,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Stratified train/test split, stratified folds within train, stratified folds over all.

    Args:
        case_ids: unique case ids.
        labels: class label per case (0/1 here; any hashable integer works).
        test_size: fraction of cases in the test set, in (0, 1).
        n_folds: number of cross-validation folds (>= 2).
        seed: random seed; the same seed and cases give the same splits.
        groups: patient id per case (the manifest's ``patient_id``), or None (every case its own
            patient: the ungrouped splits). With groups, no patient is ever on both sides of any
            split, and the result holds ``groups`` (case id -> patient id).

    Raises:
        SplitError: duplicate ids, mismatched lengths, bad sizes, a class with fewer members
            than folds (the message gives the class counts), or fewer patients than folds.
    """
    from sklearn.model_selection import train_test_split

    ids = [str(c) for c in case_ids]
    labs = [int(v) for v in labels]
    if len(ids) != len(labs):
        raise SplitError(f"{len(ids)} case ids but {len(labs)} labels")
    dups = sorted(k for k, v in Counter(ids).items() if v > 1)
    if dups:
        raise SplitError(f"duplicate case ids: {', '.join(dups)}")
    if not 0.0 < float(test_size) < 1.0:
        raise SplitError(f"test_size must be a fraction in (0, 1), found {test_size}")
    if int(n_folds) < 2:
        raise SplitError(f"n_folds must be >= 2, found {n_folds}")
    n_folds, seed = int(n_folds), int(seed)
    if groups is not None:
        groups = [str(g) for g in groups]
        if len(groups) != len(ids):
            raise SplitError(f"{len(ids)} case ids but {len(groups)} patient ids")
        empty = [c for c, g in zip(ids, groups, strict=True) if not g]
        if empty:
            raise SplitError(f"empty patient_id for case(s) {', '.join(empty[:10])}")
    order = np.argsort(ids, kind="stable")
    ids = [ids[i] for i in order]
    labs = [labs[i] for i in order]
    grps = [groups[i] for i in order] if groups is not None else None
    counts = Counter(labs)
    if len(counts) < 2:
        raise SplitError(f"stratified splitting needs two classes; class counts are {dict(counts)}")
    # Enough cases per class that train (after the test split) still has n_folds of each.
    needed = int(np.ceil(n_folds / (1.0 - float(test_size)))) + 1
    _check_counts(labs, needed, f"train/test split with test_size {test_size} then {n_folds} folds in train")
    if grps is None:
        train, test = train_test_split(
            ids, test_size=float(test_size), stratify=labs, random_state=seed, shuffle=True
        )
    else:
        train, test = grouped_train_test(ids, labs, grps, test_size=float(test_size), seed=seed)
    label_of = dict(zip(ids, labs, strict=True))
    group_of = dict(zip(ids, grps, strict=True)) if grps is not None else None
    train, test = sorted(train), sorted(test)
    train_folds = _stratified_folds(train, [label_of[c] for c in train], n_folds, seed, "train folds",
                                    [group_of[c] for c in train] if group_of else None)
    all_folds = _stratified_folds(ids, labs, n_folds, seed, "folds over all cases", grps)
    splits = {
        "seed": seed,
        "test_size": float(test_size),
        "n_folds": n_folds,
        "train": train,
        "test": test,
        "train_folds": train_folds,
        "all_folds": all_folds,
    }
    if group_of is not None:
        splits[GROUPS_KEY] = dict(sorted(group_of.items()))
    return splits


def patients_on_both_sides(splits: Mapping[str, Any]) -> list[str]:
    """Patients with cases on both sides of any split (train/test, a fold of train_folds or of
    all_folds against the rest); empty when the splits are not grouped or keep patients whole."""
    group_of = splits.get(GROUPS_KEY)
    if not group_of:
        return []
    bad: set[str] = set()

    def sides(assignment: Mapping[str, Any]) -> None:
        seen: dict[str, set[Any]] = {}
        for case, side in assignment.items():
            seen.setdefault(str(group_of[case]), set()).add(side)
        bad.update(p for p, s in seen.items() if len(s) > 1)

    sides({**{c: "train" for c in splits["train"]}, **{c: "test" for c in splits["test"]}})
    sides(splits["train_folds"])
    sides(splits["all_folds"])
    return sorted(bad)


def repeated_splits(
    case_ids: Sequence[str], labels: Sequence[int], *, n_repeats: int, test_size: float, n_folds: int, seed: int,
    groups: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The splits of repeats 1 .. ``n_repeats`` - 1 of the repeated evaluation: :func:`make_splits`
    with seed ``seed + r`` (repeat 0 is the committed split, made with ``seed``), grouped by
    patient when ``groups`` are given."""
    return [make_splits(case_ids, labels, test_size=test_size, n_folds=n_folds, seed=seed + r, groups=groups)
            for r in range(1, int(n_repeats))]


def validate_splits(splits: Any, source: str = "splits") -> dict[str, Any]:
    """Check a splits mapping's structure; return it. Raises SplitError naming ``source``."""
    if not isinstance(splits, dict):
        raise SplitError(f"{source}: expected a JSON object, found {type(splits).__name__}")
    missing = [k for k in SPLIT_KEYS if k not in splits]
    if missing:
        raise SplitError(f"{source}: missing key(s) {', '.join(missing)}")
    train, test = splits["train"], splits["test"]
    if not isinstance(train, list) or not isinstance(test, list):
        raise SplitError(f"{source}: 'train' and 'test' must be lists of case ids")
    both = sorted(set(train) & set(test))
    if both:
        raise SplitError(f"{source}: case(s) in both train and test: {', '.join(map(str, both[:10]))}")
    if len(set(train)) != len(train) or len(set(test)) != len(test):
        raise SplitError(f"{source}: duplicate case ids in 'train' or 'test'")
    n_folds = splits["n_folds"]
    if not isinstance(n_folds, int) or n_folds < 2:
        raise SplitError(f"{source}: 'n_folds' must be an integer >= 2, found {n_folds!r}")
    for key, expected in (("train_folds", set(train)), ("all_folds", set(train) | set(test))):
        folds = splits[key]
        if not isinstance(folds, dict):
            raise SplitError(f"{source}: '{key}' must map case id -> fold")
        if set(folds) != expected:
            extra, lacking = sorted(set(folds) - expected), sorted(expected - set(folds))
            raise SplitError(
                f"{source}: '{key}' must cover exactly its cases; extra {extra[:10]}, missing {lacking[:10]}"
            )
        bad = sorted(c for c, k in folds.items() if not isinstance(k, int) or not 0 <= k < n_folds)
        if bad:
            raise SplitError(f"{source}: '{key}' has folds outside 0..{n_folds - 1} for {bad[:10]}")
    if GROUPS_KEY in splits:
        groups = splits[GROUPS_KEY]
        if not isinstance(groups, dict) or set(groups) != set(train) | set(test):
            raise SplitError(f"{source}: '{GROUPS_KEY}' must map every case id to its patient id")
        split_patients = patients_on_both_sides(splits)
        if split_patients:
            raise SplitError(
                f"{source}: patient(s) {', '.join(split_patients[:10])} have cases on both sides of a split"
            )
    return splits


def write_splits(path: str | Path, splits: dict[str, Any]) -> None:
    """Validate and write splits as JSON (atomically)."""
    write_json(path, validate_splits(splits, str(path)))


def read_splits(path: str | Path) -> dict[str, Any]:
    """Read and validate a splits JSON file."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: splits file not found (run `bonemet split`)")
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SplitError(f"{path}: not valid JSON ({exc})") from exc
    return validate_splits(splits, str(path))
