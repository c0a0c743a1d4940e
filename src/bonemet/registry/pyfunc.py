"""The served classifier: an MLflow pyfunc around the fitted pipeline, cut down for speed.

One request carries the 1316 PyRadiomics features of a lesion; the pipeline reads about 15.
MLflow enforces a column signature column by column (about 0.15 ms per declared column, so
~150 ms a request) and, worse, silently drops unknown columns and casts booleans to numbers
before the model sees them. So the signature declares **no input columns, only the ``threshold``
param**, and the model checks the rows itself (:class:`bonemet.serving.checks.FeatureContract`):
set-based name checks (duplicate, unknown and missing columns are refused, naming them), value
checks on the columns it reads only (numbers, not booleans, finite); the other known columns are
accepted and ignored. The pipeline is served as
:func:`bonemet.modeling.reduction.serving_model` made it: cut to the selected columns where its
steps are column-wise, checked bit for bit against the full pipeline when logged. The work per
request is :class:`bonemet.serving.served.ServedClassifier`'s (no MLflow there: code that reads
the artifact files directly answers the same).

Every answer row: ``case_id`` (when sent), ``probability_breast``, ``label`` (at the registered
threshold, or the request's ``threshold`` param), ``in_domain`` and ``domain_reasons`` (see
:mod:`bonemet.modeling.domain`).

Bad input raises :class:`InputRefused` (an ``MlflowException`` with INVALID_PARAMETER_VALUE):
``mlflow models serve`` answers HTTP 400 with the message, never a 500, and the message names
rows and columns but never echoes feature values.

The model carries its own code: the ``bonemet`` package is logged with it (``code_paths``), and
its requirements are the installed versions of the distributions it imports
(:mod:`bonemet.registry.environment`), so it loads in a fresh environment built from them.
The pipeline and domain are stored with skops; only types from the modules in
:data:`bonemet.modeling.persistence.TRUSTED_MODULES` are loaded.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from bonemet.tracking.base import Tracker

log = logging.getLogger(__name__)

#: Artifact files, by their keys in bonemet.serving.served.
FILES = {"pipeline": "pipeline.skops", "serving": "serving.skops", "domain": "domain.skops", "meta": "classifier.json"}
#: Set by ``mlflow models serve`` in its server processes (``scoring_server._SERVER_MODEL_PATH``).
_SERVER_MARKER = "__pyfunc_model_path__"


class InputRefused(MlflowException):
    """Bad feature rows: HTTP 400 with our message.

    MLflow's scoring server (3.17) rewrites the message of every ``MlflowException`` raised by
    ``predict`` to ``"Failed to predict data '<the input frame>'. Error: ..."``, which would put
    the feature values in the answer and the server log. This exception keeps its own message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._own_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_own_message"):  # the first assignment, in MlflowException.__init__
            self._own_message = value


def enable_tcp_nodelay() -> None:
    """Make asyncio set TCP_NODELAY on every accepted TCP connection, in this process.

    With ``mlflow models serve -w N`` (N > 1) uvicorn binds the listening socket itself with
    ``proto=0``; accepted sockets inherit it, asyncio then skips TCP_NODELAY (uvicorn issue
    #3149, uvicorn 0.54), and every keep-alive answer waits ~40 ms for the client's delayed ACK.
    This replaces asyncio's private ``base_events._set_nodelay`` with one that does not look at
    ``proto``; where that helper does not exist, nothing changes.
    """
    import asyncio.base_events as base_events
    import socket

    if not hasattr(base_events, "_set_nodelay") or not hasattr(socket, "TCP_NODELAY"):
        return

    def _set_nodelay(sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    base_events._set_nodelay = _set_nodelay


def split_frame(split: Any) -> pd.DataFrame | None:
    """``pd.DataFrame(columns=split["columns"], data=split["data"])``, built in bulk; None where the
    fast path does not apply (then pandas builds it).

    pandas infers each column's dtype from the column's values, one column at a time: ~7.5 ms for
    one row of 1316 features, most of a served request. Here every column whose values are all
    Python floats (what ``json.loads`` gives for JSON numbers with a fraction or exponent) becomes
    one float64 block in one step, and pandas infers the others (``case_id``, integers, text,
    null) itself, column by column as before; the frame is the same, dtypes and order included
    (``tests/test_serving_model.py`` checks it against pandas on generated bodies). Applies to
    ``dataframe_split`` bodies with ``columns`` (distinct strings), ``data`` (rows: lists of that
    length) and no ``index``.
    """
    if not isinstance(split, dict) or split.keys() - {"columns", "data"}:
        return None
    columns, data = split.get("columns"), split.get("data")
    if not (isinstance(columns, list) and isinstance(data, list) and data and columns):
        return None
    n = len(columns)
    if not all(type(c) is str for c in columns) or len(set(columns)) != n:
        return None
    if not all(type(row) is list and len(row) == n for row in data):
        return None
    is_float = [type(v) is float for v in data[0]]
    for row in data[1:]:
        is_float = [f and type(v) is float for f, v in zip(is_float, row, strict=True)]
    floats = [j for j in range(n) if is_float[j]]
    if not floats:
        return None
    others = [j for j in range(n) if not is_float[j]]
    block = np.array([[row[j] for j in floats] for row in data], dtype=np.float64)
    frame = pd.DataFrame(block, columns=[columns[j] for j in floats])
    if others:
        rest = pd.DataFrame([[row[j] for j in others] for row in data], columns=[columns[j] for j in others])
        frame = pd.concat([rest, frame], axis=1)
        if others != list(range(len(others))):  # not all before the floats: back into the sent order
            frame = frame[columns]
    return frame


def _holds_huge_whole_float(node: Any) -> bool:
    """Does a decoded JSON document hold a whole-number float of 2**63 or more in magnitude?

    orjson reads integer literals beyond 64 bits as floats where ``json.loads`` gives ints; such a
    document is left to ``json.loads`` (~0.18 ms for a 1316-feature body).
    """
    stack = [node]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
        elif type(item) is float and abs(item) >= 9.2e18 and item.is_integer():
            return True
    return False


def enable_fast_request_parsing() -> None:
    """Make MLflow's scoring server parse JSON requests with orjson and build ``dataframe_split``
    frames with :func:`split_frame`, with the same results.

    In this process only (the server's), wrapping two functions of ``mlflow.pyfunc.scoring_server``
    (MLflow 3.17) that every JSON request goes through, twice for the first: ``_decode_json_input``
    (``json.loads`` of a 78 kB body: 0.47 ms; orjson and a check of its result: 0.25 ms; where
    orjson refuses a body (NaN literals, lone surrogates, other encodings) or might have read it
    otherwise (integers beyond 64 bits), ``json.loads`` decides as before) and
    ``dataframe_from_parsed_json`` (bodies with an index, records, a schema to enforce or any other
    shape still go to MLflow's own code). Where a function does not exist, it is left alone.
    """
    from mlflow.pyfunc import scoring_server

    decode = getattr(scoring_server, "_decode_json_input", None)
    if decode is not None and not getattr(decode, "bonemet_fast", False):
        try:
            import orjson
        except ImportError:
            orjson = None
        if orjson is not None:
            def _decode_json_input(json_input):
                if isinstance(json_input, bytes | str):
                    try:
                        decoded = orjson.loads(json_input)
                    except orjson.JSONDecodeError:
                        decoded = None
                    if isinstance(decoded, dict) and not _holds_huge_whole_float(decoded):
                        return decoded
                return decode(json_input)

            _decode_json_input.bonemet_fast = True
            scoring_server._decode_json_input = _decode_json_input

    build = getattr(scoring_server, "dataframe_from_parsed_json", None)
    if build is not None and not getattr(build, "bonemet_fast", False):
        def dataframe_from_parsed_json(decoded_input, pandas_orient, schema=None):
            if pandas_orient == "split" and schema is None:
                frame = split_frame(decoded_input)
                if frame is not None:
                    return frame
            return build(decoded_input, pandas_orient, schema=schema)

        dataframe_from_parsed_json.bonemet_fast = True
        scoring_server.dataframe_from_parsed_json = dataframe_from_parsed_json


def hide_frame_values() -> None:
    """Make pandas print a DataFrame as its summary (rows, columns, dtypes), never its values.

    MLflow's scoring server puts the request's frame into the message of every error raised while
    predicting (e.g. its own check of a ``threshold`` param that is not a number); with this, the
    answer and the log name its shape and columns but carry no feature values. Process-wide: for
    the server process only.
    """
    pd.set_option("display.large_repr", "info")
    pd.set_option("display.max_rows", 0)  # every non-empty frame is "too long": the summary
    pd.set_option("display.max_columns", 1)


class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc model: feature rows in, probability, label and domain verdict out
    (:class:`bonemet.serving.served.ServedClassifier` does the work)."""

    def load_context(self, context: Any) -> None:
        from bonemet.serving.served import ServedClassifier

        self.served = ServedClassifier.from_artifacts(context.artifacts)
        #: every feature column the model accepts, in training order (clients send these)
        self.feature_names: list[str] = self.served.feature_names
        self.threshold: float = self.served.threshold
        self.model_name: str = self.served.model_name
        self.domain = self.served.domain
        if os.environ.get(_SERVER_MARKER):
            # In `mlflow models serve` only: full garbage collections would walk the ~200k
            # objects of mlflow, pandas and scikit-learn (110-130 ms, about one request in 300);
            # frozen, they take ~1 ms. Keep-alive answers without the 40 ms Nagle stall. Requests
            # parsed by orjson, their frames built in bulk. And the input frame MLflow puts into its own error messages
            # shows no values.
            import gc

            enable_tcp_nodelay()
            enable_fast_request_parsing()
            hide_frame_values()
            gc.collect()
            gc.freeze()

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would derive a signature
        """Probability of breast origin, label and domain verdict per row; case_id echoed when sent."""
        from bonemet.errors import UserError

        frame = pd.DataFrame(model_input) if isinstance(model_input, dict) else model_input
        try:
            return self.served.answer(frame, (params or {}).get("threshold"))
        except UserError as exc:  # bad rows, a bad threshold, a site the harmonisation never saw
            raise InputRefused(str(exc)) from exc


def bonemet_code(tmp_dir: str | Path) -> str:
    """A copy of the installed ``bonemet`` package (no caches) under ``tmp_dir``, for ``code_paths``."""
    import shutil

    import bonemet

    target = Path(tmp_dir) / "bonemet"
    shutil.copytree(Path(bonemet.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def log_classifier(
    tracker: Tracker,
    pipeline: Any,
    feature_names: Sequence[str],
    *,
    threshold: float,
    model_name: str,
    domain: Any,
    check_rows: pd.DataFrame,
    text_columns: Sequence[str] = (),
    pip_requirements: Sequence[str] | None = None,
    name: str = "classifier",
) -> Any:
    """Log the pyfunc classifier in ``tracker``'s open run; returns MLflow's ModelInfo.

    Args:
        tracker: a :class:`bonemet.tracking.Tracker` with an open run (an
            :class:`~bonemet.registry.store.MlflowTracker` to register the model).
        pipeline: the fitted pipeline (DataFrame of ``feature_names`` and ``text_columns`` in).
        feature_names: its training feature columns, in order: the columns a client may send.
        threshold: the registered operating threshold.
        model_name: which classifier (e.g. ``logreg``).
        domain: its fitted :class:`bonemet.modeling.domain.TrainingDomain`.
        check_rows: feature rows (the feature table): the served form is checked on them bit for
            bit, and two of them are the input example.
        text_columns: text columns the pipeline reads (``site`` when it harmonises per site).
        pip_requirements: None (default): the installed versions of what the model imports.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from bonemet.modeling.domain import VOLUME_FEATURE
    from bonemet.modeling.persistence import save_pipeline
    from bonemet.modeling.reduction import serving_model
    from bonemet.registry.environment import classifier_requirements

    names = list(feature_names)
    plan = serving_model(pipeline, names, check_rows, text_columns=text_columns)
    log.info("%s served %s (%s)", model_name, plan.model.mode, plan.reason)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {key: Path(tmp) / file for key, file in FILES.items()}
        save_pipeline(pipeline, paths["pipeline"])
        save_pipeline(plan.model, paths["serving"])
        save_pipeline(domain, paths["domain"])
        meta = {"feature_names": names, "threshold": float(threshold), "model_name": model_name,
                "mode": plan.model.mode, "input": plan.model.input, "reason": plan.reason,
                "required_columns": list(plan.model.columns), "text_columns": list(plan.model.text_columns),
                "volume_column": VOLUME_FEATURE if VOLUME_FEATURE in names else None,
                "domain": domain.summary()}
        paths["meta"].write_text(json.dumps(meta, indent=1), encoding="utf-8")
        example = check_rows.loc[:, [*names, *text_columns]].head(2).astype({c: "float64" for c in names})
        signature = ModelSignature(
            inputs=None,
            outputs=Schema([ColSpec("double", "probability_breast"), ColSpec("long", "label"),
                            ColSpec("boolean", "in_domain")]),
            params=ParamSchema([ParamSpec("threshold", "double", float(threshold))]),
        )
        requirements = list(pip_requirements) if pip_requirements is not None else classifier_requirements(pipeline)
        return tracker.log_model(
            ClassifierPyfunc(), name, flavor="pyfunc",
            artifacts={key: str(path) for key, path in paths.items()},
            signature=signature,
            input_example=(example, {"threshold": float(threshold)}),
            pip_requirements=requirements,
            code_paths=[bonemet_code(tmp)],
            metadata={"serving_mode": plan.model.mode, "required_columns": len(plan.model.columns)},
        )
