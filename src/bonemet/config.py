"""Settings: one typed, frozen spec per ``params.yaml`` section, and the loader that builds them.

``params.yaml`` is the only home of a tunable. The library has no defaults of its own: the
entry points build a :class:`Params` with :func:`load_specs` and pass its sections (or values
taken from them) to the library.

* Every spec forbids unknown keys, and every field is required: a misspelt key is an error
  naming its full path and the closest valid keys (``segment.train.lrr: unknown key; did you
  mean lr?``), and a key missing from params.yaml is an error too. Wrong types and values out
  of range are errors naming the key, the value found and what was expected.
* ``segment.profile`` picks ``segment.profiles.<name>``, deep-merged over the common
  ``segment`` keys; every profile is validated, not only the one in use.
* Specs are pydantic models (frozen, so a stage cannot change its settings behind the params
  file's back); ``spec.model_dump(mode="json")`` gives the plain values for logging.

The library never reads params.yaml, argv or the environment itself.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bonemet.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(UserError, ValueError):
    """A params file is missing or unreadable, or a key in it is unknown, missing or invalid."""

    exit_code = 2


class PlanRequiredError(UserError, ValueError):
    """A setting is still ``auto`` where only a value can be used: the plan was not applied."""


def setting(spec: BaseModel, dotted: str) -> Any:
    """The value at a dotted path of a spec (``setting(params, "segment.train.batch_size")``)."""
    node: Any = spec
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def unplanned_keys(spec: BaseModel, section: str) -> list[str]:
    """The :data:`PLANNED_KEYS` under ``section`` (e.g. ``"segment"``) whose value in ``spec`` is ``auto``."""
    return [key for key in PLANNED_KEYS
            if key.partition(".")[0] == section and setting(spec, key.partition(".")[2]) == AUTO]


# --- loading ---------------------------------------------------------------------------------


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params YAML file into a plain dict (no validation: see :func:`load_specs`)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the repository root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"params file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"params file {path} must hold a mapping at the top level")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (used for params profiles)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --- field types -----------------------------------------------------------------------------

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
OpenFraction = Annotated[float, Field(gt=0, lt=1)]
Overlap = Annotated[float, Field(ge=0, lt=1)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
#: worker processes: a positive count, or -1 for every core
NJobs = Annotated[int, Field(ge=-1)]
SpacingMM = tuple[PositiveFloat, PositiveFloat, PositiveFloat]
SizeVox = tuple[PositiveInt, PositiveInt, PositiveInt]
#: ``register.model``: the family with the highest mean CV AUC on the training set (never a test set)
BEST_CV = "best_cv"
#: The name lists, each spelt once: every Literal below and every table keyed by these names
#: (``modeling.classifiers.CLASSIFIERS``, ``segmentation.networks.NETWORKS``) derives from them
#: (tests/test_config.py checks the tables).
#: ``train.models``: the classifier families
CLASSIFIER_NAMES = ("svm", "logreg", "knn", "random_forest", "extra_trees", "xgboost", "lightgbm", "mlp")
#: ``segment.model``: a network trained in ten folds, or masks made elsewhere (``segment.external``)
SEGMENT_MODELS = ("missu", "unet", "unetr", "swinunetr", "external")
#: ``radiomics.sources``: whose masks the features are extracted from
MASK_SOURCES = ("manual", "auto", "annotator")
#: ``select.scaler``
SCALERS = ("standard", "yeo-johnson", "quantile")
ClassifierName = Literal[CLASSIFIER_NAMES]  # type: ignore[valid-type]
#: ``register.model``: a classifier's name or :data:`BEST_CV`
RegisteredModel = Literal[(*CLASSIFIER_NAMES, BEST_CV)]  # type: ignore[valid-type]
SegmentModel = Literal[SEGMENT_MODELS]  # type: ignore[valid-type]
MaskSource = Literal[MASK_SOURCES]  # type: ignore[valid-type]
#: A planned setting's value ``auto``: taken from the cohort's plan (``plan.out``, the plan stage's
#: ``data/plan.json``); any other value is explicit and wins over the plan.
AUTO = "auto"
Auto = Literal["auto"]
#: The settings the plan stage can choose (dotted params paths), in the order it plans them.
PLANNED_KEYS = ("preprocess.target_spacing_mm", "preprocess.hu_window", "segment.roi_size",
                "preprocess.crop.min_size_vox", "segment.train.batch_size", "segment.train.max_steps")


class Spec(BaseModel):
    """Base of every settings spec: frozen, every field required, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    def updated(self, changes: Mapping[str, Any]) -> typing.Self:
        """A validated copy with ``changes`` applied; dotted keys reach nested specs (``"train.lr"``)."""
        data = self.model_dump(mode="python")
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            if leaf not in node:
                raise ParamsError(f"{dotted}: unknown key{_did_you_mean(leaf, node)}")
            node[leaf] = value
        return validate_spec(type(self), data, where="")


def _n_jobs_not_zero(value: int) -> int:
    if value == 0:
        raise ValueError("must be a positive number of processes or -1 (every core), not 0")
    return value


# --- search spaces (Optuna), one format for classifiers and segmentation ---------------------


class FloatRange(Spec):
    """A float hyperparameter in [low, high], log-uniform when ``log``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if not self.low < self.high:
            raise ValueError(f"low must be below high; found low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0; found low={self.low}")
        return self


class IntRange(Spec):
    """An integer hyperparameter in [low, high] by ``step``, log-uniform when ``log``."""

    type: Literal["int"]
    low: int
    high: int
    step: PositiveInt
    log: bool

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if not self.low <= self.high:
            raise ValueError(f"low must not exceed high; found low={self.low}, high={self.high}")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("a log range needs low >= 1 and step 1")
        return self


class Choice(Spec):
    """A categorical hyperparameter."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


SearchParam = Annotated[Union[FloatRange, IntRange, Choice], Field(discriminator="type")]  # noqa: UP007


# --- sections --------------------------------------------------------------------------------


class ProtocolSpec(Spec):
    """``data.synthetic.protocols[i]``: one site's acquisition protocol, relative to the cohort's own
    per-case scanner variation (see :mod:`bonemet.data.synthetic`)."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    noise_scale: PositiveFloat
    blur_scale: PositiveFloat
    hu_offset: float
    slice_thickness_mm: tuple[PositiveFloat, PositiveFloat] | None

    @field_validator("slice_thickness_mm")
    @classmethod
    def _thickness(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] <= value[1]:
            raise ValueError(f"must be [low, high] mm with low <= high; found {list(value)}")
        return value


class SyntheticSpec(Spec):
    """``data.synthetic``: the default synthetic cohort."""

    n_cases: Annotated[int, Field(ge=4)]
    n_positive: PositiveInt
    seed: int
    size: Literal["full", "small"]
    sites: PositiveInt
    protocols: list[ProtocolSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _both_classes(self) -> SyntheticSpec:
        if self.n_positive >= self.n_cases:
            raise ValueError(f"n_positive must be below n_cases; found {self.n_positive} of {self.n_cases}")
        if self.sites > len(self.protocols):
            raise ValueError(f"sites must not exceed the {len(self.protocols)} protocols; found {self.sites}")
        names = [p.name for p in self.protocols]
        if len(set(names)) != len(names):
            raise ValueError(f"protocol names must be unique; found {names}")
        return self


class DataSpec(Spec):
    """``data``: where the cohort lives and how its masks mark the lesion."""

    cohort_dir: str
    source: Literal["synthetic", "user"]
    mask_label: PositiveInt
    roi: Annotated[str, Field(min_length=1)] | None
    segment: PositiveInt | Annotated[str, Field(min_length=1)] | None
    pseudonymize: bool
    pseudonym_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    synthetic: SyntheticSpec


class ValidateSpec(Spec):
    """``validate``: the cohort rules (HU, mm, mL)."""

    min_spacing_mm: PositiveFloat
    max_spacing_mm: PositiveFloat
    hu_min: float
    hu_max: float
    hu_air_max: float
    hu_min_range: PositiveFloat
    grid_tolerance_mm: PositiveFloat
    lesion_volume_ml: tuple[NonNegativeFloat, PositiveFloat]
    #: the validate stage's report.json and report.txt (read by the report and the training domain)
    out_dir: str

    @model_validator(mode="after")
    def _ranges(self) -> ValidateSpec:
        if self.min_spacing_mm > self.max_spacing_mm:
            raise ValueError("min_spacing_mm must not exceed max_spacing_mm")
        if self.hu_min >= self.hu_max:
            raise ValueError("hu_min must be below hu_max")
        if self.lesion_volume_ml[0] >= self.lesion_volume_ml[1]:
            raise ValueError("lesion_volume_ml must be [min, max] with min < max")
        return self


class CropSpec(Spec):
    """``preprocess.crop``: the bone region the network sees."""

    bone_threshold_hu: float
    min_component_ml: NonNegativeFloat
    margin_mm: NonNegativeFloat
    #: ``auto``: the planned network crop (``segment.roi_size``, as x, y, z)
    min_size_vox: SizeVox | Auto


class PreprocessSpec(Spec):
    """``preprocess``: resampling, HU window and crop of the network inputs (``auto``: planned)."""

    target_spacing_mm: SpacingMM | Auto
    image_interpolator: Literal["bspline", "linear"]
    mask_interpolator: Literal["nearest", "linear"]
    hu_window: tuple[float, float] | Auto
    crop: CropSpec
    n_jobs: NJobs
    out_dir: str

    _n_jobs = field_validator("n_jobs")(_n_jobs_not_zero)

    @field_validator("hu_window")
    @classmethod
    def _window(cls, value: tuple[float, float] | str) -> tuple[float, float] | str:
        if value != AUTO and not value[0] < value[1]:
            raise ValueError(f"must be [low, high] HU with low < high; found {list(value)}")
        return value


class SplitSpec(Spec):
    """``split``: the train/test split and the folds."""

    test_size: OpenFraction
    n_folds: Annotated[int, Field(ge=2)]
    out: str


class SegTrainSpec(Spec):
    """``segment.train``: the SGD loop, its schedule (epochs, or a budget of optimiser steps) and early stopping."""

    lr: PositiveFloat
    momentum: Annotated[float, Field(ge=0, lt=1)]
    nesterov: bool
    weight_decay: NonNegativeFloat
    lr_schedule: Literal["poly", "cosine", "constant"]
    poly_power: PositiveFloat
    lambda_dice: NonNegativeFloat
    lambda_ce: NonNegativeFloat
    batch_size: PositiveInt | Auto
    num_samples: PositiveInt
    max_epochs: PositiveInt
    #: optimiser steps per fold, rounded up to whole epochs (None: the epoch schedule, max_epochs;
    #: auto: planned from segment.plan.train_megavoxels)
    max_steps: PositiveInt | Auto | None
    #: epochs without a lower validation loss before stopping (None: off, the budget decides)
    patience: PositiveInt | None
    min_delta: NonNegativeFloat
    min_epochs: PositiveInt
    #: epochs over which a flat validation Dice means converged (None: off)
    converge_window: Annotated[int, Field(ge=2)] | None
    converge_tol: NonNegativeFloat
    grad_clip: PositiveFloat | None
    val_mode: Literal["full", "crops"]
    val_overlap: Overlap | None
    channels_last: bool
    num_workers: NonNegativeInt


class AugmentSpec(Spec):
    """``segment.augment``: seeded MONAI augmentation (intensities in normalised units)."""

    pos: NonNegativeFloat
    neg: NonNegativeFloat
    flip_prob: Probability
    rotate_prob: Probability
    rotate_range_deg: NonNegativeFloat
    intensity_prob: Probability
    intensity_shift: NonNegativeFloat
    intensity_scale: NonNegativeFloat

    @model_validator(mode="after")
    def _some_crops(self) -> AugmentSpec:
        if self.pos + self.neg <= 0:
            raise ValueError("pos + neg must be > 0 (the ratio of lesion-centred to background crops)")
        return self


class InferenceSpec(Spec):
    """``segment.inference``: sliding-window inference and test-time mirroring."""

    overlap: Overlap
    sw_batch_size: PositiveInt
    mirror_axes: tuple[int, ...]
    roi_size: SizeVox | None
    bone_margin_mm: NonNegativeFloat | None
    channels_last: bool

    @field_validator("mirror_axes")
    @classmethod
    def _axes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(a not in (0, 1, 2) for a in value) or len(set(value)) != len(value):
            raise ValueError(f"must be distinct spatial axes among 0, 1, 2 (D, H, W); found {list(value)}")
        return tuple(sorted(value))


class MissuNetSpec(Spec):
    """``segment.networks.missu``: MISSU's sizes (see :class:`bonemet.segmentation.missu.MISSU`)."""

    widths: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt]
    blocks: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt, NonNegativeInt]
    embed_dim: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    mlp_dim: PositiveInt
    groups: PositiveInt
    dropout: Overlap
    embed_dropout: Overlap
    attn_dropout: Overlap
    fusion_dilations: tuple[PositiveInt, ...]
    distill_scales: tuple[Literal[8, 4, 2, 1], ...]
    stem_stride: Literal[1, 2]
    self_distillation: bool
    teacher_trainable: bool


class NetworksSpec(Spec):
    """``segment.networks``: keyword arguments of each network (MONAI's own for the baselines)."""

    missu: MissuNetSpec
    unet: dict[str, Any]
    unetr: dict[str, Any]
    swinunetr: dict[str, Any]


class SegTuneSpec(Spec):
    """``segment.tune``: Optuna over ``segment.train`` keys on the first fold's validation split."""

    n_trials: NonNegativeInt
    #: MedianPruner on each trial's best validation Dice per epoch: finished trials before it prunes
    pruner_startup_trials: NonNegativeInt
    #: null: in memory (the same seed gives the same trials); or an SQLAlchemy URL: the study under a
    #: deterministic name in that database, resumed when it exists (as ``train.tuning.storage``)
    storage: str | None
    search_space: dict[str, SearchParam]

    @field_validator("search_space")
    @classmethod
    def _train_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        known = set(SegTrainSpec.model_fields)
        for key in value:
            if key not in known:
                raise ValueError(f"'{key}' is not a segment.train key{_did_you_mean(key, known)}")
        return value


class SegPlanSpec(Spec):
    """``segment.plan``: the budgets the plan stage fits the crop and the batch into (per profile)."""

    max_crop_voxels: Annotated[int, Field(ge=512)]
    memory_mb: PositiveFloat
    max_batch_size: PositiveInt
    #: training compute per fold, in millions of crop voxels through the network (optimiser steps x
    #: batch size x crops per case x crop voxels): what ``segment.train.max_steps: auto`` is planned from
    train_megavoxels: PositiveFloat | None


class SegBiasSpec(Spec):
    """``segment.bias``: when the segmentation's error depends on the class."""

    #: the segment stage warns when the labels' mean out-of-fold Dice differ by more than this
    max_dice_gap: Probability


class SegGateSpec(Spec):
    """``segment.gate``: what the registered segmentation model must reach before it gets the alias."""

    min_dice: Probability


class ExternalMasksSpec(Spec):
    """``segment.external``: automatic masks made elsewhere (``segment.model: external``)."""

    masks_dir: Annotated[str, Field(min_length=1)]
    label: PositiveInt


class SegmentSpec(Spec):
    """``segment`` with its profile (``segment.profiles.<profile>``) merged in."""

    profile: str
    model: SegmentModel
    external: ExternalMasksSpec
    roi_size: SizeVox | Auto
    plan: SegPlanSpec
    distill_weight: NonNegativeFloat
    val_fraction: Overlap
    threshold: OpenFraction
    largest_component: bool
    device: Literal["auto", "cpu", "cuda"]
    amp: bool
    num_threads: PositiveInt | None
    parallel_folds: PositiveInt
    final_model: Literal["best_fold", "none"]
    train: SegTrainSpec
    augment: AugmentSpec
    inference: InferenceSpec
    networks: NetworksSpec
    tune: SegTuneSpec
    masks_dir: str
    work_dir: str
    metrics: str
    cases_table: str
    plots_dir: str
    experiment: str
    model_name: str
    alias: str
    gate: SegGateSpec
    bias: SegBiasSpec

    @model_validator(mode="after")
    def _planned_steps_need_a_budget(self) -> SegmentSpec:
        if self.train.max_steps == AUTO and self.plan.train_megavoxels is None:
            raise ValueError("train.max_steps is auto (planned), so plan.train_megavoxels (the training compute per "
                             "fold it is planned from) must be set; or give train.max_steps a number, or null for "
                             "the epoch schedule")
        return self


class PlanSpec(Spec):
    """``plan``: how the plan stage fingerprints the cohort and plans the ``auto`` settings."""

    out: str
    n_jobs: NJobs
    samples_per_case: Annotated[int, Field(ge=100)]
    anisotropy_threshold: Annotated[float, Field(gt=1)]
    lowres_axis_percentile: Annotated[float, Field(ge=0, le=50)]
    finest_spacing_percentile: Annotated[float, Field(ge=0, le=50)]
    lesion_extent_percentile: Annotated[float, Field(ge=50, le=100)]
    context_factor: Annotated[float, Field(ge=1)]
    intensity_percentiles: tuple[Annotated[float, Field(ge=0, le=100)], Annotated[float, Field(ge=0, le=100)]]
    lesion_hu_range: tuple[float, float]
    min_hu_spread: PositiveFloat
    warn_anisotropy: Annotated[float, Field(gt=1)]
    min_lesion_voxels: PositiveInt

    _n_jobs = field_validator("n_jobs")(_n_jobs_not_zero)

    @model_validator(mode="after")
    def _ordered(self) -> PlanSpec:
        if not self.intensity_percentiles[0] < self.intensity_percentiles[1]:
            raise ValueError(f"intensity_percentiles must be [low, high] with low < high; found "
                             f"{list(self.intensity_percentiles)}")
        if not self.lesion_hu_range[0] < self.lesion_hu_range[1]:
            raise ValueError(f"lesion_hu_range must be [low, high] HU with low < high; found {list(self.lesion_hu_range)}")
        return self


class ReportSpec(Spec):
    """``report``: the HTML report (its other inputs are the outputs named by the other sections)."""

    out: str
    title: str
    #: cases drawn with their manual and automatic contours (best and worst by Dice first)
    example_cases: PositiveInt
    #: MLflow UI address (e.g. http://127.0.0.1:5000) for links to runs; null: run ids only
    mlflow_ui_url: str | None


class RadiomicsSpec(Spec):
    """``radiomics``: PyRadiomics settings over ``settings_file``, the pool and the cache."""

    settings_file: str
    bin_width: PositiveFloat
    resampled_spacing_mm: tuple[()] | SpacingMM
    interpolator: Literal[
        "sitkNearestNeighbor", "sitkLinear", "sitkBSpline", "sitkGaussian", "sitkLabelGaussian",
        "sitkHammingWindowedSinc", "sitkCosineWindowedSinc", "sitkWelchWindowedSinc",
        "sitkLanczosWindowedSinc", "sitkBlackmanWindowedSinc",
    ]
    normalize: bool
    n_jobs: NJobs
    cache_dir: str
    allow_drop: bool
    #: the extract stage's feature tables (``<source>.parquet``, ``summary.json``, ``dropped.json``)
    out_dir: str
    sources: list[MaskSource] = Field(min_length=1)
    experiment: str

    _n_jobs = field_validator("n_jobs")(_n_jobs_not_zero)


class TrackingSpec(Spec):
    """``tracking``: the local MLflow store (``MLFLOW_TRACKING_URI`` overrides it for a team server)
    and how long a stage waits for an unreachable server before it stops."""

    store_dir: str
    http_max_retries: NonNegativeInt
    http_backoff_factor: NonNegativeInt
    http_timeout_s: PositiveInt
    #: each pipeline stage's log (its lines and every warning in full): <log_dir>/<stage>.log, also in MLflow
    log_dir: str
    #: CPU, memory (and GPU) use logged on the long stages' parent runs (segment, train, evaluate)
    system_metrics: bool
    system_metrics_interval_s: PositiveFloat


class ComputeSpec(Spec):
    """``compute``: where the per-case work of ``preprocess`` and ``extract`` runs.

    ``local``: a process pool on this machine (``preprocess.n_jobs``, ``radiomics.n_jobs``
    processes). ``dask``: the tasks of a Dask scheduler at ``dask_address`` (its workers set the
    parallelism; they must have bonemet installed and see the same paths). Either gives the same
    outputs, so the switch is no DVC parameter of those stages.
    """

    scheduler: Literal["local", "dask"]
    #: the scheduler's address (``tcp://host:8786``); null with ``scheduler: local``
    dask_address: str | None
    #: seconds to wait for the scheduler to answer before the stage stops with an error
    dask_connect_timeout_s: PositiveFloat

    @model_validator(mode="after")
    def _address(self) -> ComputeSpec:
        if self.scheduler == "dask" and not self.dask_address:
            raise ValueError("scheduler is dask, so dask_address must name the scheduler (tcp://host:8786)")
        if self.scheduler == "local" and self.dask_address is not None:
            raise ValueError(f"scheduler is local but dask_address is {self.dask_address!r}: set scheduler: dask "
                             "to use that scheduler, or dask_address: null")
        return self


class RegisterSpec(Spec):
    """``register``: the registered classifier, its gate and where the stage reads and writes."""

    experiment: str
    model_name: str
    alias: str
    #: the family registered: a name of ``train.models`` (checked in :class:`Params`) or ``best_cv``
    model: RegisteredModel
    min_auc: Probability
    min_auc_lower_bound: Probability
    min_sensitivity: Probability
    min_specificity: Probability
    tolerance: NonNegativeFloat
    max_gap_to_best: Probability
    out: str


class BaselineSpec(Spec):
    """``evaluate.baseline``: the plain baseline (standardised L1 logistic regression on every feature)."""

    n_cs: Annotated[int, Field(ge=1)]
    c_min: PositiveFloat
    c_max: PositiveFloat
    max_iter: PositiveInt

    @model_validator(mode="after")
    def _ordered(self) -> BaselineSpec:
        if not self.c_min <= self.c_max:
            raise ValueError(f"c_min must not exceed c_max; found {self.c_min} > {self.c_max}")
        return self


class EvaluateSpec(Spec):
    """``evaluate``: metrics, intervals, figures and the repeated evaluation of the whole pipeline."""

    repeats: Annotated[int, Field(ge=1)]
    n_jobs: NJobs
    out_dir: str
    experiment: str
    alpha: OpenFraction
    n_bootstrap: PositiveInt
    auc_ci: Literal["normal", "logit"]
    calibration_bins: Annotated[int, Field(ge=2)]
    calibration_strategy: Literal["quantile", "uniform"]
    dca_thresholds: tuple[OpenFraction, OpenFraction, OpenFraction]
    figure_dpi: Annotated[int, Field(ge=10, le=1200)]
    decimals: Annotated[int, Field(ge=0, le=10)]
    baseline: BaselineSpec

    _n_jobs = field_validator("n_jobs")(_n_jobs_not_zero)

    @field_validator("dca_thresholds")
    @classmethod
    def _grid(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"must be [start, stop, step] with start < stop; found {list(value)}")
        return value


class IccSpec(Spec):
    """``select.icc``: the reproducibility filter (automatic vs manual masks)."""

    enabled: bool
    threshold: Annotated[float, Field(ge=-1, le=1)]
    form: Literal["ICC(2,1)", "ICC(3,1)", "ICC(1,1)"]
    paired_prefix: Annotated[str, Field(min_length=1)]
    min_features: PositiveInt


class CorrelationSpec(Spec):
    """``select.correlation``: the redundancy filter."""

    enabled: bool
    threshold: Annotated[float, Field(gt=0, le=1)]


class PcaSpec(Spec):
    """``select.pca``: optional PCA on z-scores."""

    enabled: bool
    n_components: OpenFraction | PositiveInt


class LassoSpec(Spec):
    """``select.lasso``: the LASSO selector."""

    alpha: PositiveFloat | None
    lambda_rule: Literal["min", "1se"]
    cv: Annotated[int, Field(ge=2)]
    n_alphas: PositiveInt
    max_features: PositiveInt
    max_iter: PositiveInt


class HarmonizeSpec(Spec):
    """``select.harmonize``: ComBat per site, the pipeline's first step (off by default)."""

    enabled: bool
    parametric: bool
    mean_only: bool


class SelectSpec(Spec):
    """``select``: feature selection, fitted inside every training fold."""

    harmonize: HarmonizeSpec
    icc: IccSpec
    correlation: CorrelationSpec
    pca: PcaSpec
    scaler: Literal[SCALERS]  # type: ignore[valid-type]
    lasso: LassoSpec


class OperatingPointSpec(Spec):
    """``train.operating_point``: how the threshold is chosen on the calibrated out-of-fold scores."""

    rule: Literal["youden", "sensitivity", "fixed"]
    target_sensitivity: Probability
    fixed_threshold: Probability


class DomainSpec(Spec):
    """``train.domain``: the training cases' domain recorded with every model (bonemet.modeling.domain)."""

    method: Literal["mahalanobis", "isolation_forest"]
    max_flag_rate: OpenFraction
    n_estimators: PositiveInt
    size_margin: NonNegativeFloat
    hu_margin: NonNegativeFloat


class TuningSpec(Spec):
    """``train.tuning``: where the Optuna studies of the train stage live and how many processes
    tune one study at once."""

    #: null: in memory (one process, the same seed gives the same trials); or an SQLAlchemy URL
    #: (``postgresql://user@host/db``): a study per model under a deterministic name, shared by
    #: ``workers`` processes (and by every machine pointed at it), resumed when it already exists
    storage: str | None
    #: processes tuning one study at once (more than 1 needs a storage)
    workers: PositiveInt

    @model_validator(mode="after")
    def _workers_need_storage(self) -> TuningSpec:
        if self.workers > 1 and self.storage is None:
            raise ValueError(f"workers is {self.workers}: processes share a study only through a storage; "
                             "set storage to a database URL (postgresql://...) or workers to 1")
        return self


class TrainSpec(Spec):
    """``train``: the classifiers, their tuning, calibration and operating point, and what the stage writes."""

    feature_source: Literal["auto", "manual"]
    out_dir: str
    plots_dir: str
    metrics_dir: str
    experiment: str
    models: list[ClassifierName] = Field(min_length=1)
    inner_folds: Annotated[int, Field(ge=2)]
    pruner_startup_trials: NonNegativeInt
    n_trials: dict[ClassifierName, NonNegativeInt]
    tuning: TuningSpec
    calibration: Literal["sigmoid", "isotonic", "none"]
    operating_point: OperatingPointSpec
    log_models: bool
    log_figures: bool
    write_figures: bool
    fixed_params: dict[ClassifierName, dict[str, Any]]
    search_space: dict[ClassifierName, dict[str, SearchParam]]
    domain: DomainSpec

    @model_validator(mode="after")
    def _per_model(self) -> TrainSpec:
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models must not repeat a name; found {self.models}")
        missing = [m for m in self.models if m not in self.n_trials]
        if missing:
            raise ValueError(f"n_trials has no entry for {', '.join(missing)} (one per model in 'models')")
        return self


class Params(Spec):
    """The whole ``params.yaml``, validated; ``segment`` has its profile merged in."""

    seed: int
    tracking: TrackingSpec
    compute: ComputeSpec
    data: DataSpec
    #: the ``validate`` section (``validate`` is a pydantic method name)
    validation: ValidateSpec = Field(alias="validate")
    preprocess: PreprocessSpec
    plan: PlanSpec
    split: SplitSpec
    segment: SegmentSpec
    report: ReportSpec
    radiomics: RadiomicsSpec
    #: the ``register`` section (``register`` is a class method of every pydantic model)
    registration: RegisterSpec = Field(alias="register")
    evaluate: EvaluateSpec
    select: SelectSpec
    train: TrainSpec

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())

    @model_validator(mode="after")
    def _registered_model_is_trained(self) -> Params:
        model = self.registration.model
        if model != BEST_CV and model not in self.train.models:
            raise ValueError(
                f"register.model: '{model}' is not trained (train.models is {self.train.models}); name one of them "
                f"or '{BEST_CV}' (the highest mean ten-fold CV AUC on the training set); found {model!r}")
        return self

    @model_validator(mode="after")
    def _bone_margin_needs_bone_in_window(self) -> Params:
        if self.preprocess.hu_window == AUTO:  # the plan keeps the bone threshold inside the window it plans
            return self
        lo, hi = self.preprocess.hu_window
        threshold = self.preprocess.crop.bone_threshold_hu
        if self.segment.inference.bone_margin_mm is not None and not lo < threshold < hi:
            raise ValueError(
                f"segment.inference.bone_margin_mm is set, so preprocess.crop.bone_threshold_hu ({threshold} HU) "
                f"must lie inside preprocess.hu_window {[lo, hi]} (the bone is found on the normalised crop); "
                "set bone_margin_mm to null or widen the window")
        return self


# --- the planned specs: what the library takes ------------------------------------------------
# A planned setting may be ``auto`` in params.yaml (the raw specs above); the stages apply the plan
# once (:func:`bonemet.planning.resolve.planned_params`) and pass these on, whose planned settings
# are values: no library function downstream of a stage can receive ``auto``.


class PlannedCropSpec(CropSpec):
    """``preprocess.crop`` with the plan applied."""

    min_size_vox: SizeVox


class PlannedPreprocessSpec(PreprocessSpec):
    """``preprocess`` with the plan applied."""

    target_spacing_mm: SpacingMM
    hu_window: tuple[float, float]
    crop: PlannedCropSpec


class PlannedSegTrainSpec(SegTrainSpec):
    """``segment.train`` with the plan applied."""

    batch_size: PositiveInt
    max_steps: PositiveInt | None


class PlannedSegmentSpec(SegmentSpec):
    """``segment`` (its profile merged in) with the plan applied."""

    roi_size: SizeVox
    train: PlannedSegTrainSpec


class PlannedParams(Params):
    """:class:`Params` with the plan applied: every :data:`PLANNED_KEYS` setting a value."""

    preprocess: PlannedPreprocessSpec
    segment: PlannedSegmentSpec


#: raw spec type -> (its planned type, the params sections it holds planned keys of)
_PLANNED_TYPES: dict[type[Spec], tuple[type[Spec], tuple[str, ...]]] = {
    Params: (PlannedParams, ("preprocess", "segment")),
    PreprocessSpec: (PlannedPreprocessSpec, ("preprocess",)),
    SegmentSpec: (PlannedSegmentSpec, ("segment",)),
}


@typing.overload
def planned_spec(spec: Params, where: str) -> PlannedParams: ...
@typing.overload
def planned_spec(spec: PreprocessSpec, where: str) -> PlannedPreprocessSpec: ...
@typing.overload
def planned_spec(spec: SegmentSpec, where: str) -> PlannedSegmentSpec: ...
def planned_spec(spec: Spec, where: str) -> Spec:
    """``spec`` (:class:`Params`, :class:`PreprocessSpec` or :class:`SegmentSpec`) as its planned type.

    The library's entry points call this on what they are given: a spec whose planned settings are
    values passes (as the planned type), one still holding ``auto`` is refused.

    Raises:
        PlanRequiredError: a planned setting is ``auto`` (names the keys and what to run).
    """
    raw = next(kind for kind in _PLANNED_TYPES if isinstance(spec, kind))
    planned_type, sections = _PLANNED_TYPES[raw]
    if isinstance(spec, planned_type):
        return spec
    if raw is Params:
        keys = [k for section in sections for k in unplanned_keys(getattr(spec, section), section)]
    else:
        keys = unplanned_keys(spec, sections[0])
    if keys:
        raise PlanRequiredError(
            f"{', '.join(keys)}: 'auto' (from the plan) reached {where} unresolved; run the plan stage "
            "(`bonemet plan`, or `dvc repro`) so the stages read the planned values from plan.out, or set "
            "explicit values in params.yaml")
    return planned_type.model_validate(spec.model_dump(mode="python"))


# --- validation with readable errors ---------------------------------------------------------


def _did_you_mean(key: str, valid: typing.Iterable[str]) -> str:
    valid = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(close)}?"
    return f"; valid keys: {', '.join(valid)}" if valid else ""


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types behind an annotation (Annotated, Optional and unions unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _is_spec(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[Any], list[str]]:
    """Follow ``loc`` (a pydantic error location) through ``model``'s annotations.

    Returns the types found at the end and the params-file path (discriminator tags, which
    pydantic adds to locations, are left out of the path).
    """
    current: list[Any] = [model]
    path: list[str] = []
    for part in loc:
        following: list[Any] = []
        tagged = [k for k in current if _is_spec(k) and "type" in k.model_fields
                  and part in typing.get_args(k.model_fields["type"].annotation)]
        if tagged and not any(_is_spec(k) and part in _field_names(k) for k in current):
            current = tagged  # a discriminated union's tag: keep the member it names
            continue
        for kind in current:
            if _is_spec(kind):
                fields = {(f.alias or name): f for name, f in kind.model_fields.items()}
                if part in fields:
                    following.extend(_unwrap(fields[part].annotation))
                continue
            origin = typing.get_origin(kind)
            if origin in (dict, Mapping):
                following.extend(_unwrap(typing.get_args(kind)[1]))
            elif origin in (list, tuple) and isinstance(part, int):
                args = [a for a in typing.get_args(kind) if a is not Ellipsis]
                index = part if origin is tuple and len(args) > 1 and part < len(args) else 0
                following.extend(_unwrap(args[index]) if args else [])
        current = following
        path.append(f"[{part}]" if isinstance(part, int) else str(part))
    return current, path


def _field_names(model: type[BaseModel]) -> list[str]:
    return sorted((f.alias or name) for name, f in model.model_fields.items())


AUTO_TAG = "literal['auto']"


def _without_auto_branch(error_list: list[Any]) -> list[Any]:
    """Errors of a setting that also takes ``auto`` as if it took only its value: pydantic reports
    one error per union member (``literal['auto']`` and the value's type, whose name it puts in the
    location); the first is dropped, the member name taken out of the location, and a wrong
    value's type error says that ``auto`` is accepted too."""
    auto_fields = {tuple(e["loc"][:-1]) for e in error_list if e["loc"] and e["loc"][-1] == AUTO_TAG}
    out = []
    for error in error_list:
        loc = tuple(error["loc"])
        if loc and loc[-1] == AUTO_TAG:
            continue
        for cut in range(len(loc)):
            if loc[:cut] in auto_fields and cut < len(loc) and isinstance(loc[cut], str):
                error = {**error, "loc": loc[:cut] + loc[cut + 1:]}
                if len(loc) == cut + 1:
                    error["msg"] = f"{error['msg']} or 'auto' (from the plan)"
                break
        out.append(error)
    return out


def _problems(model: type[BaseModel], error_list: list[Any]) -> list[tuple[list[str], str]]:
    """``(params path parts, message)`` for each pydantic error."""
    out = []
    for error in _without_auto_branch(error_list):
        loc = tuple(error["loc"])
        _, path = _walk(model, loc)
        kind = error["type"]
        if kind == "extra_forbidden":
            parent, _ = _walk(model, loc[:-1])
            valid = [name for k in parent if _is_spec(k) for name in _field_names(k)]
            message = f"unknown key{_did_you_mean(str(loc[-1]), valid)}"
        elif kind == "missing" and loc and isinstance(loc[-1], int):
            message = "too few values in this list"
        elif kind == "missing":
            message = "missing key: every setting lives in params.yaml, with no default elsewhere"
        else:
            found = error.get("input")
            shown = repr(found)
            if isinstance(found, Mapping | list | tuple) and len(shown) > 80:
                shown = f"a {'mapping' if isinstance(found, Mapping) else 'list'} of {len(found)}"
            text = str(error["msg"]).removeprefix("Value error, ")
            message = text if "; found " in text else f"{text}; found {shown}"
        out.append((path, message))
    return out


def _format(problems: list[tuple[list[str], str]], where: str = "") -> str:
    """One line per problem (``path: message``); several are listed under a count."""
    lines = []
    for path, message in problems:
        dotted = ".".join(([where] if where else []) + path).replace(".[", "[")
        named = not dotted and message.partition(": ")[0].replace(".", "").replace("_", "").isalnum()
        lines.append(message if named else f"{dotted or '(top level)'}: {message}")  # a cross-section check names its key
    lines = list(dict.fromkeys(lines))
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems in the params:\n  " + "\n  ".join(lines)


SpecT = typing.TypeVar("SpecT", bound=BaseModel)


def validate_spec(model: type[SpecT], data: Any, where: str) -> SpecT:
    """``model`` built from ``data``; :class:`ParamsError` listing every problem with its full path.

    ``where`` is the dotted params path of ``data`` (e.g. ``"segment"``), prefixed to each path.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(_format(_problems(model, exc.errors()), where)) from None


def resolve_segment(raw: Mapping[str, Any], profile: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(segment with its profile merged, {profile: merged})`` from the raw ``segment`` section.

    Raises:
        ParamsError: an unknown profile, or no ``profiles`` mapping.
    """
    seg = dict(raw)
    profiles = seg.pop("profiles", None)
    if not isinstance(profiles, Mapping) or not profiles:
        raise ParamsError("segment.profiles: missing key (a mapping of profile name -> overrides, e.g. cpu, paper)")
    name = profile if profile is not None else seg.get("profile")
    merged = {str(p): {**deep_merge(seg, dict(o or {})), "profile": str(p)} for p, o in profiles.items()}
    if name not in merged:
        raise ParamsError(f"segment.profile: '{name}' is not a profile{_did_you_mean(str(name), merged)}")
    return merged[str(name)], merged


def _profile_path(path: list[str], override: Mapping[str, Any], profile: str) -> list[str]:
    """A ``segment.<key>`` path whose key the profile sets, pointed at ``segment.profiles.<profile>``."""
    node: Any = override
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return ["segment", *path]
        node = node[part]
    return ["segment", "profiles", profile, *path]


def build_specs(raw: Mapping[str, Any], *, segment_profile: str | None = None) -> Params:
    """Validate a whole params mapping into :class:`Params` (every segment profile checked).

    Raises:
        ParamsError: every unknown, missing or invalid key, with its path.
    """
    if not isinstance(raw, Mapping):
        raise ParamsError("params must be a mapping of sections")
    data = dict(raw)
    seg_raw = data.get("segment")
    problems: list[tuple[list[str], str]] = []
    if isinstance(seg_raw, Mapping):
        chosen, merged = resolve_segment(seg_raw, segment_profile)
        overrides = dict(seg_raw.get("profiles") or {})
        base = {k: v for k, v in seg_raw.items() if k != "profiles"}
        try:  # the common keys are a whole configuration too, even where every profile overrides one
            SegmentSpec.model_validate(base)
        except ValidationError as exc:
            problems += [(["segment", *path], message) for path, message in _problems(SegmentSpec, exc.errors())]
        for name, profile_data in merged.items():
            try:
                SegmentSpec.model_validate(profile_data)
            except ValidationError as exc:
                problems += [(_profile_path(path, overrides.get(name) or {}, name), message)
                             for path, message in _problems(SegmentSpec, exc.errors())]
        data["segment"] = chosen
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        problems += [(path, message) for path, message in _problems(Params, exc.errors())
                     if not (path and path[0] == "segment")]  # segment: reported per profile above
        if not problems:  # pragma: no cover - segment errors are always caught per profile
            problems = _problems(Params, exc.errors())
    if problems:
        raise ParamsError(_format(problems))
    return params


def load_specs(path: str | Path = DEFAULT_PARAMS, *, segment_profile: str | None = None) -> Params:
    """Read and validate a params file (see :func:`build_specs`)."""
    return build_specs(load_params(path), segment_profile=segment_profile)
