"""Loading registered models for prediction: ``bonemet-classifier`` and ``bonemet-segmenter`` by alias.

Each loader resolves ``name@alias`` to a version first and loads that exact version, so the
version reported is the one used. For the project's local store (SQLite + artifacts on disk) the
alias and the version's model folder are read without MLflow (:mod:`bonemet.registry.local`),
and the classifier is read from its artifacts (:class:`bonemet.serving.served.ServedClassifier`, what
the served pyfunc itself runs):
``bonemet predict`` with a given mask then never imports MLflow (1.7 s) or torch. Any other store
(``MLFLOW_TRACKING_URI`` pointing at a server) goes through MLflow, which is then imported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bonemet.errors import UserError
from bonemet.registry.local import pyfunc_artifacts, read_mlmodel, resolve_alias

log = logging.getLogger(__name__)


class ModelNotFoundError(UserError, ValueError):
    """No registered model version answers to ``name@alias``, or it cannot be loaded."""


def _not_found(name: str, alias: str, tracking_uri: str, hint: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"no registered model '{name}@{alias}' in the MLflow store {tracking_uri}: {hint}")


def _mlflow_version(store: Any, name: str, alias: str, hint: str) -> str:
    """The version of ``name@alias`` asked of MLflow (a remote or unusual store)."""
    from bonemet.registry.store import alias_version

    version = alias_version(store, name, alias)
    if version is None:
        raise _not_found(name, alias, store.tracking_uri, hint)
    return version


def _store(tracking_uri: str | None, store_dir: str | None) -> Any:
    """The client of ``tracking_uri`` (None: the local store of ``store_dir``)."""
    from bonemet.registry.store import client

    return client(tracking_uri, store_dir or ".")


@dataclass
class RegisteredClassifier:
    """The pyfunc ``bonemet-classifier`` of one version loaded through MLflow: feature rows in,
    probability out (used for stores that are not local).

    Attributes:
        model: the loaded MLflow pyfunc model.
        name, version: registered name and version.
        feature_names: the feature columns the model accepts (its training columns), in order.
        threshold: the probability threshold registered with the model.
        domain: the domain of its training cases (:class:`bonemet.modeling.domain.TrainingDomain`),
            None for a model registered without one.
    """

    model: Any
    name: str
    version: str
    feature_names: list[str]
    threshold: float | None
    domain: Any = None

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        """``probability_breast`` and ``label`` per row; input problems raise ValueError, not MlflowException."""
        from mlflow.exceptions import MlflowException

        from bonemet.serving.predict import PredictError

        try:
            return self.model.predict(features)
        except MlflowException as exc:
            raise PredictError(f"{self.name} version {self.version} refused the features: {exc.message}") from exc


_CLASSIFIER_HINT = "run the pipeline (`make run`) or `bonemet promote VERSION --alias ALIAS`"


def load_classifier(name: str, alias: str, *, tracking_uri: str | None = None, store_dir: str | None = None) -> Any:
    """Load ``name@alias`` (the pyfunc logged by :func:`bonemet.registry.pyfunc.log_classifier`).

    Args:
        tracking_uri: the store (``MLFLOW_TRACKING_URI`` or the project's local store); None: the
            local store of ``store_dir``, through MLflow.
        store_dir: the local store's folder (``tracking.store_dir``).

    Returns:
        a :class:`~bonemet.serving.served.ServedClassifier` (local store, no MLflow) or a
        :class:`RegisteredClassifier`; both have ``predict``, ``feature_names``, ``threshold``,
        ``name`` and ``version``.

    Raises:
        ModelNotFoundError: no such alias, or the model cannot be loaded.
    """
    local = resolve_alias(tracking_uri, name, alias) if tracking_uri else None
    if local is False:
        raise _not_found(name, alias, tracking_uri, _CLASSIFIER_HINT)
    if local is not None:
        artifacts = pyfunc_artifacts(local.model_dir, read_mlmodel(local.model_dir))
        if artifacts is not None:
            from bonemet.serving.served import ServedClassifier

            model = ServedClassifier.from_artifacts(artifacts, name=name, version=local.version)
            log.info("classifier %s version %s (alias '%s') from %s: %d features, threshold %s", name,
                     local.version, alias, local.model_dir, len(model.feature_names), model.threshold)
            return model
    return _load_classifier_with_mlflow(name, alias, tracking_uri, store_dir)


def _load_classifier_with_mlflow(name: str, alias: str, tracking_uri: str | None,
                                 store_dir: str | None) -> RegisteredClassifier:
    from mlflow.exceptions import MlflowException

    from bonemet.registry.store import load_model

    store = _store(tracking_uri, store_dir)
    version = _mlflow_version(store, name, alias, _CLASSIFIER_HINT)
    try:
        model = load_model(store, f"models:/{name}/{version}", flavor="pyfunc")
    except (MlflowException, OSError) as exc:
        raise ModelNotFoundError(f"{name} version {version} (alias '{alias}') cannot be loaded: {exc}") from exc
    feature_names: list[str] = []
    threshold: float | None = None
    domain = None
    try:
        inner = model.unwrap_python_model()
        feature_names = list(getattr(inner, "feature_names", []) or [])
        threshold = getattr(inner, "threshold", None)
        domain = getattr(inner, "domain", None)
    except (MlflowException, AttributeError):
        pass
    if not feature_names:
        schema = model.metadata.get_input_schema()
        if schema is not None:
            feature_names = [n for n in schema.input_names() if n not in ("case_id", "label")]
    log.info("classifier %s version %s (alias '%s'): %d features, threshold %s", name, version, alias,
             len(feature_names), threshold)
    return RegisteredClassifier(model, name, version, feature_names, None if threshold is None else float(threshold),
                                domain)


_SEGMENTER_HINT = "run `bonemet segment`, or give the lesion mask with --mask"


def load_segmenter(name: str, alias: str, *, device: str, tracking_uri: str | None = None,
                   store_dir: str | None = None) -> tuple[Any, dict[str, Any], str]:
    """Load the segmentation network ``name@alias`` (pytorch flavour) onto ``device``.

    The alias and the model folder come from the local store when it can be read directly
    (``tracking_uri`` as for :func:`load_classifier`); the network is always loaded with
    ``mlflow.pytorch`` (the flavour that logged it).

    Returns:
        ``(network, metadata, version)``: the ``torch.nn.Module`` in eval mode, the metadata
        logged with it (the inference settings; see ``bonemet.stages.segment``) and the version.

    Raises:
        ModelNotFoundError: no such alias, or the model cannot be loaded.
    """
    from mlflow.exceptions import MlflowException

    from bonemet.registry.store import load_model, model_metadata
    from bonemet.segmentation.networks import evaluable

    local = resolve_alias(tracking_uri, name, alias) if tracking_uri else None
    if local is False:
        raise _not_found(name, alias, tracking_uri, _SEGMENTER_HINT)
    try:
        if local is not None:  # a model folder: no store to ask
            version, uri, store = local.version, str(local.model_dir), None
            metadata = dict(read_mlmodel(local.model_dir).get("metadata") or {})
        else:
            store = _store(tracking_uri, store_dir)
            version = _mlflow_version(store, name, alias, _SEGMENTER_HINT)
            uri = f"models:/{name}/{version}"
            metadata = model_metadata(store, uri)
        network = load_model(store, uri, flavor="pytorch", map_location=device)
    except (MlflowException, OSError) as exc:
        raise ModelNotFoundError(f"{name} version {version} (alias '{alias}') cannot be loaded: {exc}") from exc
    network = evaluable(network)  # a pt2 (torch.export) module, which refuses eval(), is wrapped
    log.info("segmenter %s version %s (alias '%s') on %s", name, version, alias, device)
    return network, metadata, version


def registered_predictor(params: Any, *, alias: str | None, threshold: float | None, device: str | None,
                         mirror: bool, pseudonym_key: bytes | None) -> Any:
    """The :class:`~bonemet.serving.predict.Predictor` over the registered models of ``alias``.

    Args:
        params: the whole :class:`~bonemet.config.Params` (registry names, store, radiomics,
            validation and segmentation settings).
        alias: registry alias of both models; None: ``register.alias``.
        threshold: probability at or above which the label is 1; None: the classifier's own.
        device: torch device for segmentation; None: ``segment.device`` (auto = CUDA when available).
        mirror: test-time mirroring as the segmenter was registered with (False: none).
        pseudonym_key: the key of ``data.pseudonymize`` (None when off): case ids from file names
            are pseudonymised with it.
    """
    import os

    from bonemet.radiomics import settings_from_params
    from bonemet.registry.local import default_tracking_uri
    from bonemet.serving.predict import NetworkSegmenter, Predictor

    alias, store_dir = alias or params.registration.alias, params.tracking.store_dir
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(store_dir)

    def segmenter() -> NetworkSegmenter:
        from bonemet.segmentation.training import resolve_device

        name = params.segment.model_name  # the name the segment stage registered it under
        on = device or str(resolve_device(params.segment.device))
        network, metadata, version = load_segmenter(name, alias, device=on, tracking_uri=tracking_uri,
                                                    store_dir=store_dir)
        model = NetworkSegmenter.from_metadata(network, metadata, device=on, name=name, version=version)
        if not mirror:
            model.settings = model.settings.without_mirroring()
        return model

    def pseudonym(case_id: str) -> str:
        from bonemet.data.pseudonym import pseudonym as keyed

        return case_id if pseudonym_key is None else keyed(case_id, pseudonym_key)

    return Predictor(
        load_classifier=lambda: load_classifier(params.registration.model_name, alias, tracking_uri=tracking_uri,
                                                store_dir=store_dir),
        load_segmenter=segmenter, radiomics_settings=settings_from_params(params), mask_label=params.data.mask_label,
        grid_tolerance_mm=params.validation.grid_tolerance_mm, min_lesion_ml=params.validation.lesion_volume_ml[0],
        threshold=threshold, alias=alias, pseudonym=pseudonym)
