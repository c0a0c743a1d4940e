"""Loading registered models for prediction: ``bonemet-classifier`` and ``bonemet-missu`` by alias.

Each loader resolves ``name@alias`` to a version first and loads that exact version
(``models:/name/version``), so the version reported is the one used. Call
:func:`bonemet.registry.store.configure` before loading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from bonemet.errors import UserError
from bonemet.registry.store import alias_version

log = logging.getLogger(__name__)


class ModelNotFoundError(UserError, ValueError):
    """No registered model version answers to ``name@alias``, or it cannot be loaded."""


def _resolve(name: str, alias: str, hint: str) -> str:
    version = alias_version(name, alias)
    if version is None:
        raise ModelNotFoundError(
            f"no registered model '{name}@{alias}' in the MLflow store {mlflow.get_tracking_uri()}: {hint}"
        )
    return version


@dataclass
class RegisteredClassifier:
    """The pyfunc ``bonemet-classifier`` of one version: feature rows in, probability out.

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
        from bonemet.serving.predict import PredictError

        try:
            return self.model.predict(features)
        except MlflowException as exc:
            raise PredictError(f"{self.name} version {self.version} refused the features: {exc.message}") from exc


def load_classifier(name: str, alias: str) -> RegisteredClassifier:
    """Load ``name@alias`` (the pyfunc logged by :func:`bonemet.registry.pyfunc.log_classifier`).

    Raises:
        ModelNotFoundError: no such alias, or the model cannot be loaded.
    """
    version = _resolve(name, alias, "run the pipeline (`make run`) or `bonemet promote VERSION --alias ALIAS`")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
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


def _evaluable(network: Any) -> Any:
    """The network in eval mode; a ``pt2`` (torch.export) module, which refuses ``eval()``, is wrapped.

    ``mlflow.pytorch`` logs ``pt2`` by default; the sliding-window inference calls
    ``model.eval()``, which an exported GraphModule answers with an error. The wrapper keeps it
    out of the module tree so that ``eval()`` reaches only the wrapper.
    """
    import torch

    try:
        network.eval()
        return network
    except (NotImplementedError, RuntimeError):
        pass

    class ExportedNetwork(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self._inner = (inner,)  # a tuple: not a registered child, so eval() stays here

        def forward(self, x):
            return self._inner[0](x)

    return ExportedNetwork(network).eval()


def load_segmenter(name: str, alias: str, *, device: str) -> tuple[Any, dict[str, Any], str]:
    """Load the segmentation network ``name@alias`` (pytorch flavour) onto ``device``.

    Returns:
        ``(network, metadata, version)``: the ``torch.nn.Module`` in eval mode, the metadata
        logged with it (preprocess kwargs, roi_size, overlap, sw_batch_size, threshold,
        largest_component; see ``bonemet.stages.segment``) and the version loaded.

    Raises:
        ModelNotFoundError: no such alias, or the model cannot be loaded.
    """
    version = _resolve(name, alias, "run `bonemet segment`, or give the lesion mask with --mask")
    uri = f"models:/{name}/{version}"
    try:
        network = mlflow.pytorch.load_model(uri, map_location=device)
        metadata = dict(mlflow.models.get_model_info(uri).metadata or {})
    except (MlflowException, OSError) as exc:
        raise ModelNotFoundError(f"{name} version {version} (alias '{alias}') cannot be loaded: {exc}") from exc
    network = _evaluable(network)
    log.info("segmenter %s version %s (alias '%s') on %s", name, version, alias, device)
    return network, metadata, version
