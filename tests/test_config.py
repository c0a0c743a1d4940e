"""The settings layer: params.yaml is the only home of a tunable, and every key in it is checked."""

from __future__ import annotations

import copy
import subprocess
import sys
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from bonemet import config
from bonemet.config import Params, ParamsError, build_specs, load_params, load_specs

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"

#: Mappings whose keys are free-form (network keyword arguments, per-model hyperparameters,
#: report headings): validated elsewhere (network constructors, check_hyperparameters).
FREE_FORM = ("segment.networks.unet", "segment.networks.unetr", "segment.networks.swinunetr",
             "train.fixed_params.", "train.search_space.")
#: Mappings keyed by names from a fixed set (models, segment.train keys): a wrong name is named too.
NAMED_KEYS = ("train.n_trials", "train.fixed_params", "train.search_space", "segment.tune.search_space")


@pytest.fixture(scope="module")
def raw() -> dict:
    return load_params(PARAMS)


def _spec_classes() -> Iterator[type[BaseModel]]:
    seen: set[type] = set()
    todo: list[type] = [Params]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        yield cls
        for field in cls.model_fields.values():
            for kind in config._unwrap(field.annotation):
                for arg in [kind, *typing.get_args(kind)]:
                    for inner in config._unwrap(arg):
                        if isinstance(inner, type) and issubclass(inner, BaseModel):
                            todo.append(inner)


def _mapping_paths(node: object, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """Every mapping in the params tree with its dotted path."""
    if isinstance(node, Mapping):
        yield prefix, node  # type: ignore[misc]
        for key, value in node.items():
            yield from _mapping_paths(value, f"{prefix}.{key}" if prefix else str(key))


def test_the_project_params_build_every_spec_and_every_profile():
    params = load_specs(PARAMS)
    assert params.segment.profile == "cpu"
    paper = load_specs(PARAMS, segment_profile="paper").segment
    assert paper.roi_size == "auto" and paper.plan.max_crop_voxels == 128**3  # planned within 128^3
    # the section names that are pydantic method names are reached by their aliases
    assert params.validation.grid_tolerance_mm == load_params(PARAMS)["validate"]["grid_tolerance_mm"]
    assert params.registration.model_name == load_params(PARAMS)["register"]["model_name"]


def test_no_spec_field_has_a_default_so_every_setting_must_be_in_params_yaml():
    offenders = [f"{cls.__name__}.{name}" for cls in _spec_classes()
                 for name, field in cls.model_fields.items() if not field.is_required()]
    assert offenders == []


def test_every_key_of_params_yaml_is_consumed_a_misspelt_one_anywhere_is_named(raw):
    """Add a misspelt key to every mapping of params.yaml in turn: each is refused, with its path."""
    checked = 0
    for path, node in _mapping_paths(raw):
        parts = path.split(".")
        plain = ".".join(parts[:1] + parts[3:]) if parts[:2] == ["segment", "profiles"] else path
        if any(plain == f or (f.endswith(".") and plain.startswith(f)) for f in FREE_FORM):
            continue
        if not node or path == "segment.profiles":  # a new profile name is a new profile, not a typo
            continue
        key = next(iter(node))
        broken = copy.deepcopy(raw)
        target = broken
        for part in [p for p in path.split(".") if p]:
            target = target[part]
        target[key + "x"] = target[key]
        with pytest.raises(ParamsError) as err:
            build_specs(broken)
        where = f"{path}.{key}x" if path else f"{key}x"
        if any(path.endswith(n) for n in NAMED_KEYS):
            assert path in str(err.value) and f"{key}x" in str(err.value), (where, str(err.value))
        else:
            assert f"{where}: unknown key; did you mean {key}" in str(err.value), (where, str(err.value))
        checked += 1
    assert checked > 40  # every section and sub-section of the project's params


def test_a_key_missing_from_params_is_an_error_not_a_silent_default(raw):
    broken = copy.deepcopy(raw)
    del broken["segment"]["train"]["momentum"]
    with pytest.raises(ParamsError, match=r"segment.train.momentum: missing key"):
        build_specs(broken)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r["segment"]["train"].update(lr=-1), r"segment.train.lr: Input should be greater than 0; found -1"),
    (lambda r: r["segment"]["profiles"]["paper"]["train"].update(lr="fast"),
     r"segment.profiles.paper.train.lr: .*valid number.*found 'fast'"),
    (lambda r: r["segment"]["profiles"]["cpu"]["train"].update(lrr=0.1),
     r"segment.profiles.cpu.train.lrr: unknown key; did you mean lr\?"),
    (lambda r: r["segment"].update(profile="gpu"), r"segment.profile: 'gpu' is not a profile; did you mean cpu\?"),
    (lambda r: r["train"].update(models=["svm", "xgbost"]), r"train.models\[1\]: Input should be 'svm'"),
    (lambda r: r["train"]["search_space"]["svm"]["C"].update(lgo=True),
     r"train.search_space.svm.C.lgo: unknown key; did you mean (low or log|log or low)\?"),
    (lambda r: r["train"]["search_space"]["svm"]["C"].update(low=200.0), r"low must be below high"),
    (lambda r: r["preprocess"]["crop"].update(min_size_vox=[32, 32]), r"min_size_vox\[2\]: too few values"),
    (lambda r: r["preprocess"].update(hu_window=[1800, -200]), r"preprocess.hu_window: must be \[low, high\]"),
    (lambda r: r["preprocess"].update(n_jobs=0), r"preprocess.n_jobs: .*not 0"),
    (lambda r: r["data"].update(mask_label=0), r"data.mask_label: Input should be greater than or equal to 1"),
    (lambda r: r["segment"]["inference"].update(mirror_axes=[0, 3]), r"segment.inference.mirror_axes: must be"),
    (lambda r: r["segment"]["tune"]["search_space"].update(lrr={"type": "float", "low": 0.1, "high": 1.0,
                                                                "log": False}),
     r"segment.tune.search_space: 'lrr' is not a segment.train key; did you mean lr\?"),
    (lambda r: r["select"]["lasso"].update(alpha="abc"), r"select.lasso.alpha: .*valid number"),
    (lambda r: r["data"]["synthetic"].update(n_positive=500), r"n_positive must be below n_cases"),
    (lambda r: r["register"].update(model="svn"), r"register.model: Input should be 'svm', .* or 'best_cv'; found 'svn'"),
    (lambda r: (r["register"].update(model="mlp"), r["train"].update(models=["svm", "logreg"])),
     r"^register.model: 'mlp' is not trained \(train.models is \['svm', 'logreg'\]\); name one of them or 'best_cv'"),
    (lambda r: r["register"].update(max_gap_to_best=1.5), r"register.max_gap_to_best: Input should be less than"),
])
def test_wrong_types_and_out_of_range_values_name_the_key(raw, mutate, message):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(ParamsError, match=message):
        build_specs(broken)


def test_several_problems_are_listed_together(raw):
    broken = copy.deepcopy(raw)
    broken["seed"] = "x"
    broken["split"]["n_folds"] = 1
    with pytest.raises(ParamsError) as err:
        build_specs(broken)
    text = str(err.value)
    assert text.startswith("2 problems in the params:") and "seed:" in text and "split.n_folds:" in text


def test_specs_are_frozen_and_updated_copies_are_validated():
    params = load_specs(PARAMS)
    with pytest.raises(ValidationError, match="frozen"):
        params.segment.train.lr = 1.0  # type: ignore[misc]
    changed = params.segment.updated({"train.lr": 0.2, "roi_size": [16, 16, 16]})
    assert changed.train.lr == 0.2 and changed.roi_size == (16, 16, 16) and params.segment.train.lr != 0.2
    with pytest.raises(ParamsError, match="Input should be greater than 0"):
        params.segment.updated({"train.lr": -1.0})
    with pytest.raises(ParamsError, match="unknown key"):
        params.segment.updated({"train.lrr": 0.1})


def _write_params(tmp_path: Path, mutate) -> Path:
    raw = load_params(PARAMS)
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("stage", ["split", "preprocess", "segment", "extract", "train", "evaluate", "register", "report",
                                   "validate"])
def test_a_misspelt_key_fails_every_stage_command_with_the_message(tmp_path, stage):
    """`bonemet <stage>` validates the whole params file before it touches any data."""
    path = _write_params(tmp_path, lambda r: r["segment"]["train"].update(lrr=0.1))
    argv = [sys.executable, "-m", "bonemet", stage, "--params", str(path)]
    if stage == "validate":
        argv.append(str(tmp_path))
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "segment.train.lrr: unknown key; did you mean lr?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_params_file_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bonemet", "split", "--params", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "params file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_every_name_table_follows_its_one_name_list():
    """Literals and tables keyed by classifier, network, mask source and scaler names derive from the
    name lists in bonemet.config: a family added to one and not the other fails here."""
    import typing

    from bonemet.config import (
        CLASSIFIER_NAMES,
        MASK_SOURCES,
        SCALERS,
        SEGMENT_MODELS,
        ClassifierName,
        SegmentModel,
    )
    from bonemet.modeling.classifiers import CLASSIFIERS, DISPLAY_NAMES
    from bonemet.modeling.pipeline import build_scaler
    from bonemet.radiomics.sources import SOURCES
    from bonemet.segmentation.networks import NETWORKS

    assert tuple(CLASSIFIERS) == CLASSIFIER_NAMES == tuple(DISPLAY_NAMES) == typing.get_args(ClassifierName)
    assert set(NETWORKS) == set(SEGMENT_MODELS) - {"external"} and typing.get_args(SegmentModel) == SEGMENT_MODELS
    assert SOURCES == MASK_SOURCES
    for scaler in SCALERS:
        assert build_scaler(scaler, 0) is not None
