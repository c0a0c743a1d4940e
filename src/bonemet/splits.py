"""Stratified train/test split and cross-validation folds, written to one splits file.

``make_splits`` returns (and ``data/splits.json`` holds)::

    {"seed": int, "test_size": float, "n_folds": int,
     "train": [ids], "test": [ids],            # stratified, e.g. 70 / 30
     "train_folds": {id: k},                   # stratified n_folds within train (classifier CV)
     "all_folds": {id: k}}                     # stratified n_folds over all cases (out-of-fold segmentation)

Ids are sorted before splitting, so the result depends only on the set of (id, label) pairs
and the seed, not on the manifest's row order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonemet.errors import UserError
from bonemet.utils import write_json

SPLIT_KEYS = ("seed", "test_size", "n_folds", "train", "test", "train_folds", "all_folds")


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
    ids: list[str], labels: list[int], n_folds: int, seed: int, what: str
) -> dict[str, int]:
    from sklearn.model_selection import StratifiedKFold

    _check_counts(labels, n_folds, what)
    folds: dict[str, int] = {}
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(ids)), labels)):
        for i in held_out:
            folds[ids[i]] = k
    return dict(sorted(folds.items()))


def make_splits(
    case_ids: Sequence[str], labels: Sequence[int], *, test_size: float, n_folds: int, seed: int
) -> dict[str, Any]:
    """Stratified train/test split, stratified folds within train, stratified folds over all.

    Args:
        case_ids: unique case ids.
        labels: class label per case (0/1 here; any hashable integer works).
        test_size: fraction of cases in the test set, in (0, 1).
        n_folds: number of cross-validation folds (>= 2).
        seed: random seed; the same seed and cases give the same splits.

    Raises:
        SplitError: duplicate ids, mismatched lengths, bad sizes, or a class with fewer
            members than folds (the message gives the class counts).
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
    order = np.argsort(ids, kind="stable")
    ids = [ids[i] for i in order]
    labs = [labs[i] for i in order]
    counts = Counter(labs)
    if len(counts) < 2:
        raise SplitError(f"stratified splitting needs two classes; class counts are {dict(counts)}")
    # Enough cases per class that train (after the test split) still has n_folds of each.
    needed = int(np.ceil(n_folds / (1.0 - float(test_size)))) + 1
    _check_counts(labs, needed, f"train/test split with test_size {test_size} then {n_folds} folds in train")
    train, test = train_test_split(
        ids, test_size=float(test_size), stratify=labs, random_state=seed, shuffle=True
    )
    label_of = dict(zip(ids, labs, strict=True))
    train, test = sorted(train), sorted(test)
    train_folds = _stratified_folds(train, [label_of[c] for c in train], n_folds, seed, "train folds")
    all_folds = _stratified_folds(ids, labs, n_folds, seed, "folds over all cases")
    return {
        "seed": seed,
        "test_size": float(test_size),
        "n_folds": n_folds,
        "train": train,
        "test": test,
        "train_folds": train_folds,
        "all_folds": all_folds,
    }


def repeated_splits(
    case_ids: Sequence[str], labels: Sequence[int], *, n_repeats: int, test_size: float, n_folds: int, seed: int
) -> list[dict[str, Any]]:
    """The splits of repeats 1 .. ``n_repeats`` - 1 of the repeated evaluation: :func:`make_splits`
    with seed ``seed + r`` (repeat 0 is the committed split, made with ``seed``)."""
    return [make_splits(case_ids, labels, test_size=test_size, n_folds=n_folds, seed=seed + r)
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
