"""The served classifier's parts: set-based input checks, the pipeline cut to its selected columns
(bit-equal), the training domain, and the pyfunc in process."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, TransformerMixin

from bonemet.modeling.reduction import decompose, serving_model
from bonemet.serving.checks import FeatureContract, FeatureInputError
from serving_data import NAMES, VOLUME, feature_tables, fitted_domain, fitted_model

FEW = [f"original_firstorder_F{i}" for i in range(5)]


def test_contract_is_set_based_and_reads_only_what_the_model_needs():
    contract = FeatureContract(known=tuple(FEW), required=(FEW[3], FEW[1]), optional=(FEW[4],))
    frame = pd.DataFrame(np.arange(15.0).reshape(3, 5), columns=FEW)
    values, texts, optional = contract.read(frame.assign(case_id=["a", "b", "c"], label=[0, 1, 0]))
    assert values.dtype == np.float64 and values.tolist() == frame[[FEW[3], FEW[1]]].to_numpy().tolist()
    assert texts == {} and optional[FEW[4]].tolist() == [4.0, 9.0, 14.0]
    # columns the model does not read: may be missing, may hold anything
    ignored = frame.drop(columns=[FEW[0]]).astype({FEW[2]: object})
    ignored.loc[1, FEW[2]] = "text"
    assert contract.read(ignored)[0].tolist() == values.tolist()
    assert FEW[4] not in contract.read(frame.drop(columns=[FEW[4]]))[2]  # optional: read only when sent

    def refused(frame, match):
        with pytest.raises(FeatureInputError, match=match):
            contract.read(frame)

    refused(frame.iloc[:0], "empty input")
    refused(frame.assign(bogus=1.0, other=2), "unknown columns: bogus, other")
    refused(pd.concat([frame, frame[[FEW[0]]]], axis=1), f"duplicate columns: {FEW[0]}")
    refused(frame.drop(columns=[FEW[3]]), f"missing 1 of the 2 columns the model reads: {FEW[3]}")
    booleans = frame.astype({FEW[1]: object})
    booleans.loc[2, FEW[1]] = True
    refused(booleans, rf"non-numeric values .* {FEW[1]} \(row 2\)")
    refused(frame.assign(**{FEW[3]: True}), f"non-numeric values .*{FEW[3]}")
    strings = frame.astype({FEW[3]: object})
    strings.loc[0, FEW[3]] = "12.5"
    refused(strings, rf"{FEW[3]} \(row 0\)")
    for bad in (np.nan, np.inf, None):
        broken = frame.astype({FEW[1]: object})
        broken.loc[1, FEW[1]] = bad
        refused(broken, rf"null\), NaN or infinite values in 1 column\(s\) \({FEW[1]}\) at row\(s\) 1")
    broken = frame.copy()
    broken.loc[0, FEW[4]] = np.nan  # an optional column is checked when sent
    refused(broken, f"NaN or infinite.*{FEW[4]}")
    # an object column of numbers (a JSON integer among floats) is accepted
    mixed = frame.astype({FEW[3]: object})
    mixed.loc[0, FEW[3]] = 3
    assert contract.read(mixed)[0][0, 0] == 3.0


def test_contract_messages_never_echo_values():
    contract = FeatureContract(known=tuple(FEW), required=tuple(FEW))
    frame = pd.DataFrame([[123456.789, 2.5, 3.25, 4.125, 5.0625]], columns=FEW).astype(object)
    frame.loc[0, FEW[2]] = "secret-987"
    with pytest.raises(FeatureInputError) as info:
        contract.read(frame)
    assert "secret-987" not in str(info.value) and "123456" not in str(info.value)


def test_text_columns_are_required_and_non_empty():
    contract = FeatureContract(known=tuple(FEW), required=tuple(FEW), text_columns=("site",))
    frame = pd.DataFrame(np.ones((2, 5)), columns=FEW)
    with pytest.raises(FeatureInputError, match="missing 1 of the 6 columns the model reads: site"):
        contract.read(frame)
    with pytest.raises(FeatureInputError, match="empty 'site' at row"):
        contract.read(frame.assign(site=["A", " "]))
    assert contract.read(frame.assign(site=["A", "B"]))[1]["site"].tolist() == ["A", "B"]


@pytest.fixture(scope="module")
def tables():
    return feature_tables(n=60, seed=0)


@pytest.fixture(scope="module")
def logreg(tables, params):
    return fitted_model(*tables, params)


def _rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[NAMES]


def test_the_project_pipeline_is_served_on_its_selected_columns_bit_for_bit(tables, logreg):
    primary, _ = tables
    plan = serving_model(logreg, NAMES, _rows(primary))
    served = plan.model
    lasso = logreg.pipeline.named_steps["lasso"]
    assert served.mode == "reduced" and served.input == "array"
    assert list(served.columns) == list(lasso.get_feature_names_out()) and 0 < len(served.columns) <= 8
    assert "bit-equal" in plan.reason
    # bit for bit, for every batch size, on rows it was not checked on
    other, _ = feature_tables(n=25, seed=7)
    for n in (1, 2, 3, 5, 25):
        rows = _rows(other).iloc[:n]
        expected = logreg.predict_proba(rows)[:, 1]
        got = served.predict_values(rows[list(served.columns)].to_numpy())
        assert np.array_equal(got, expected), n
    # what the classifier sees is the same too (the domain judges it)
    transform, _, _ = decompose(logreg)
    assert np.array_equal(np.asarray(served.classifier_input(_rows(other)[list(served.columns)].to_numpy())),
                          np.asarray(transform.transform(_rows(other))))


HYPERPARAMETERS = {
    "svm": {"kernel": "rbf", "calibration_folds": 3, "C": 1.0, "gamma": 0.1},
    "knn": {"n_neighbors": 5, "weights": "distance", "p": 2},
    "random_forest": {"n_estimators": 30, "max_depth": 3, "min_samples_leaf": 2, "max_features": "sqrt"},
    "xgboost": {"tree_method": "hist", "eval_metric": "logloss", "n_estimators": 30, "max_depth": 3,
                "learning_rate": 0.1, "subsample": 0.8, "colsample_bytree": 0.8, "reg_lambda": 1.0},
    "lightgbm": {"n_estimators": 30, "num_leaves": 7, "learning_rate": 0.1, "min_child_samples": 5,
                 "subsample": 0.8, "subsample_freq": 1, "colsample_bytree": 0.8, "reg_lambda": 1.0},
    "mlp": {"max_iter": 300, "early_stopping": False, "hidden_units": 8, "n_layers": 1, "alpha": 0.01,
            "learning_rate_init": 0.001},
}


@pytest.mark.parametrize(("model", "scaler"), [("svm", "standard"), ("knn", "yeo-johnson"),
                                               ("random_forest", "quantile"), ("xgboost", "standard"),
                                               ("lightgbm", "yeo-johnson"), ("mlp", "quantile")])
def test_every_classifier_and_scaler_is_served_reduced_and_exact(model, scaler, params):
    primary, paired = feature_tables(n=40, seed=1, names=NAMES[:120])
    names = NAMES[:120]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of the tiny fits
        fitted = fitted_model(primary, paired, params, model=model, hyperparameters=HYPERPARAMETERS[model],
                              select={"scaler": scaler})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-request warning about feature names
        plan = serving_model(fitted, names, primary[names])
        served = plan.model
        assert served.mode == "reduced", plan.reason
        rows = primary[names].iloc[:9]
        assert np.array_equal(served.predict_values(rows[list(served.columns)].to_numpy()),
                              fitted.predict_proba(rows)[:, 1])
    # the study's model runs without scikit-learn's per-call checks; the others through scikit-learn
    assert served.engine == ("direct" if model == "svm" else "sklearn"), plan.reason


@pytest.mark.parametrize("calibration", ["sigmoid", "isotonic"])
@pytest.mark.parametrize("model", ["svm", "logreg"])
def test_the_direct_engine_gives_the_pipelines_bits_and_survives_saving(model, calibration, params, tmp_path):
    from bonemet.modeling.calibration import ScoreCalibrator
    from bonemet.modeling.persistence import load_pipeline, save_pipeline

    primary, paired = feature_tables(n=50, seed=3, names=NAMES[:150])
    names = NAMES[:150]
    fitted = fitted_model(primary, paired, params, model=model,
                          hyperparameters=HYPERPARAMETERS.get(model))
    scores = fitted.pipeline.predict_proba(primary[names])[:, 1]
    fitted.calibrator = ScoreCalibrator(method=calibration).fit(scores, primary["label"].to_numpy())
    served = serving_model(fitted, names, primary[names]).model
    assert served.engine == "direct"
    other, _ = feature_tables(n=30, seed=11, names=names)
    values = other[list(served.columns)].to_numpy()
    for n in (1, 2, 5, 30):
        assert np.array_equal(served.predict_values(values[:n]), fitted.predict_proba(other[names].iloc[:n])[:, 1])
    # the function built on first use is not stored; a loaded model builds its own and agrees
    save_pipeline(served, tmp_path / "served.skops")
    loaded = load_pipeline(tmp_path / "served.skops")
    assert "_direct" in vars(served) and "_direct" not in vars(loaded) and loaded.engine == "direct"
    assert np.array_equal(loaded.predict_values(values), served.predict_values(values))
    # switched off, the same model answers through scikit-learn, with the same bits
    loaded.engine = "sklearn"
    assert np.array_equal(loaded.predict_values(values), served.predict_values(values))


def test_the_direct_engine_refuses_what_it_does_not_cover(params):
    from bonemet.modeling.direct import NotDirect, compile_direct

    primary, paired = feature_tables(n=40, seed=4, names=NAMES[:100])
    fitted = fitted_model(primary, paired, params, model="random_forest",
                          hyperparameters=HYPERPARAMETERS["random_forest"])
    transform, classifier, calibrator = decompose(fitted)
    with pytest.raises(NotDirect, match="RandomForestClassifier"):
        compile_direct(transform, classifier, calibrator)
    plan = serving_model(fitted, NAMES[:100], primary[NAMES[:100]])
    assert plan.model.engine == "sklearn" and "not covered" in plan.reason


def test_steps_that_mix_columns_are_served_whole(params):
    primary, paired = feature_tables(n=40, seed=2, names=NAMES[:80])
    names = NAMES[:80]
    fitted = fitted_model(primary, paired, params, select={"pca.enabled": True, "pca.n_components": 5})
    plan = serving_model(fitted, names, primary[names])
    assert plan.model.mode == "full" and list(plan.model.columns) == names
    assert "step 'pca' (PCA) is not column-wise" in plan.reason
    rows = primary[names].iloc[:4]
    assert np.array_equal(plan.model.predict_values(rows.to_numpy()), fitted.predict_proba(rows)[:, 1])


class SiteShift(TransformerMixin, BaseEstimator):
    """Stands in for a harmonisation step: per-site offsets (mixes in a text column, not column-wise)."""

    def __init__(self, site_column="site"):
        self.site_column = site_column

    def fit(self, X, y=None):
        self.feature_names_in_ = np.asarray([c for c in X.columns if c != self.site_column], dtype=object)
        self.offsets_ = {s: X.loc[X[self.site_column] == s, self.feature_names_in_].mean().to_numpy()
                         for s in sorted(set(X[self.site_column]))}
        return self

    def transform(self, X):
        values = X[list(self.feature_names_in_)].to_numpy(dtype=float)
        shift = np.stack([self.offsets_[s] for s in X[self.site_column]])
        return pd.DataFrame(values - shift, columns=self.feature_names_in_, index=X.index)

    def set_output(self, transform=None):
        return self


def test_a_pipeline_reading_a_site_column_is_served_whole_with_the_site_required():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    primary, _ = feature_tables(n=30, seed=3, names=NAMES[:10])
    X = primary[NAMES[:10]].assign(site=np.where(np.arange(30) % 2, "A", "B"))
    pipe = Pipeline([("harmonize", SiteShift()), ("clf", LogisticRegression(max_iter=1000))]).fit(X, primary["label"])
    plan = serving_model(pipe, NAMES[:10], X, text_columns=["site"])
    assert plan.model.mode == "full" and list(plan.model.text_columns) == ["site"]
    rows = X.iloc[:5]
    got = plan.model.predict_values(rows[NAMES[:10]].to_numpy(), {"site": rows["site"].to_numpy()})
    assert np.array_equal(got, pipe.predict_proba(rows)[:, 1])


def test_domain_threshold_flags_at_most_the_rate_out_of_fold(tables, logreg, params):
    from bonemet.modeling.domain import TrainingDomain

    primary, _ = tables
    for method in ("mahalanobis", "isolation_forest"):
        spec = params.train.domain.updated({"method": method, "n_estimators": 50})
        domain = fitted_domain(logreg, primary, spec)
        assert domain.method == method
        assert 0 < domain.oof_flag_rate_ <= spec.max_flag_rate
        assert domain.in_sample_flag_rate_ <= spec.max_flag_rate
        assert domain.columns_ == list(logreg.pipeline.named_steps["lasso"].get_feature_names_out())
        lo, hi = domain.ranges_["lesion_volume_ml"]
        assert lo == primary[VOLUME].min() / 1000 and hi == primary[VOLUME].max() / 1000
        # far away in feature space: flagged, with the reason
        transform, _, _ = decompose(logreg)
        Z = np.asarray(transform.transform(primary[NAMES].iloc[:2]), dtype=float)
        far = Z + 50 * np.asarray(Z.std(axis=0) + 1)
        [near, away] = domain.feature_reasons(np.vstack([Z[:1], far[:1]]))
        assert not near and "lie far from the training cases" in away[0]
        # a 300 mL lesion is outside the volume range
        [[reason]] = domain.feature_reasons(Z[:1], volumes_ml=[300.0])
        assert reason.startswith("lesion volume 300 mL is above the training cases'")
        json.dumps(domain.summary())
    with pytest.raises(ValueError, match="at least two folds"):
        TrainingDomain(method="mahalanobis", max_flag_rate=0.05, n_estimators=10, size_margin=0.25, hu_margin=200,
                       random_state=0).fit(Z, [0, 0], columns=["a"] * Z.shape[1])


def test_domain_image_ranges_with_margins(tables, logreg, params):
    primary, _ = tables
    images = {"spacing_min_mm": [0.6, 0.9], "spacing_max_mm": [1.0, 3.0], "hu_min": [-1024.0, -1000.0],
              "hu_max": [1500.0, 2500.0]}
    domain = fitted_domain(logreg, primary, params.train.domain, images=images)
    ok = {"spacing_min_mm": 0.5, "spacing_max_mm": 3.7, "hu_min": -1200.0, "hu_max": 2600.0}  # within the margins
    assert domain.image_reasons(ok) == []
    reasons = domain.image_reasons({**ok, "spacing_max_mm": 5.0, "hu_max": 400.0})
    assert reasons == ["coarsest voxel spacing 5 mm is above the training cases' 1 to 3 mm",
                       "highest intensity 400 HU is below the training cases' 1500 to 2500 HU"]


def _tracker(store_dir):
    """A tracker on a local store in ``store_dir``."""
    from bonemet.registry.store import MlflowTracker

    return MlflowTracker("serving-test", tracking_uri=None, store_dir=store_dir, system_metrics=False,
                         system_metrics_interval_s=None)


def test_pyfunc_in_process_answers_and_refuses(tables, logreg, params, tmp_path, monkeypatch):
    """The logged model, loaded back in this process, answers as the pipeline does."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from bonemet.registry.pyfunc import InputRefused
    from bonemet.registry.store import load_model

    primary, _ = tables
    domain = fitted_domain(logreg, primary, params.train.domain)
    from bonemet.registry.pyfunc import log_classifier

    tracker = _tracker(tmp_path)
    with tracker.run("register"):
        info = log_classifier(tracker, logreg, NAMES, threshold=0.5, model_name="logreg", domain=domain,
                              check_rows=primary)
    model = load_model(tracker.client, info.model_uri)
    assert model.metadata.get_input_schema() is None  # params only: MLflow leaves the columns to us
    assert [p.name for p in model.metadata.get_params_schema().params] == ["threshold"]
    rows = primary.head(4)
    out = model.predict(rows)
    assert list(out.columns) == ["case_id", "probability_breast", "label", "in_domain", "domain_reasons"]
    assert np.array_equal(out["probability_breast"].to_numpy(), logreg.predict_proba(rows[NAMES])[:, 1])
    assert out["case_id"].tolist() == rows["case_id"].tolist()
    assert out["in_domain"].tolist() == [not r for r in out["domain_reasons"]]
    assert model.predict(rows, params={"threshold": 0.0})["label"].tolist() == [1, 1, 1, 1]
    for bad in ({"threshold": 1.5}, {"threshold": -0.1}):
        with pytest.raises(MlflowException, match="threshold must be within"):
            model.predict(rows, params=bad)
    with pytest.raises(InputRefused, match="unknown columns: bogus") as refused:
        model.predict(rows.assign(bogus=1.0))
    # MLflow's scoring server prefixes the message with the input frame: ours keeps its own
    # the same artifact files read without MLflow answer the same
    from bonemet.registry.pyfunc import FILES
    from bonemet.serving.served import ServedClassifier

    location = tracker.client.get_logged_model(info.model_id).artifact_location
    folder = Path(mlflow.artifacts.download_artifacts(location))
    served = ServedClassifier.from_artifacts({k: folder / "artifacts" / f for k, f in FILES.items()}, name="m",
                                             version="1")
    pd.testing.assert_frame_equal(served.predict(rows), out)
    refused.value.message = f"Failed to predict data '{rows}'. \nError: {refused.value.message}"
    assert refused.value.message.startswith("unknown columns: bogus")
    assert json.loads(refused.value.serialize_as_json())["error_code"] == "INVALID_PARAMETER_VALUE"


def test_combat_pipeline_is_served_whole_and_needs_a_known_site(params, tmp_path, monkeypatch):
    """select.harmonize: ComBat reads each row's site; the served model requires it and refuses a
    site the training data never had (400), and answers bit for bit otherwise."""

    from bonemet.modeling.calibration import CalibratedPipeline, ScoreCalibrator
    from bonemet.modeling.pipeline import build_pipeline
    from bonemet.modeling.training import assemble_features
    from bonemet.registry.pyfunc import InputRefused, log_classifier
    from bonemet.registry.store import load_model

    names = NAMES[:60]
    primary, paired = feature_tables(n=40, seed=4, names=names)
    sites = {c: ("A" if k % 2 else "B") for k, c in enumerate(primary["case_id"])}
    select = params.select.updated({"harmonize.enabled": True, "lasso.cv": 3, "lasso.max_features": 5})
    X, y = assemble_features(primary, paired, select.icc.paired_prefix, sites)
    pipeline = build_pipeline("logreg", {"solver": "saga", "max_iter": 5000, "C": 1.0, "l1_ratio": 0.5}, select,
                              0).fit(X, y.to_numpy())
    served_rows = primary.assign(site=primary["case_id"].map(sites))
    scores = pipeline.predict_proba(served_rows[[*names, "site"]])[:, 1]
    model = CalibratedPipeline(pipeline=pipeline, calibrator=ScoreCalibrator(method="sigmoid").fit(scores, y),
                               threshold=0.5)
    plan = serving_model(model, names, served_rows, text_columns=["site"])
    assert plan.model.mode == "full" and "text column(s) site" in plan.reason
    domain = fitted_domain(model, served_rows[[*names, "site"]], params.train.domain)
    tracker = _tracker(tmp_path)
    with tracker.run("register"):
        info = log_classifier(tracker, model, names, threshold=0.5, model_name="logreg", domain=domain,
                              check_rows=served_rows, text_columns=["site"])
    loaded = load_model(tracker.client, info.model_uri)
    rows = served_rows.head(5)
    out = loaded.predict(rows)
    assert np.array_equal(out["probability_breast"].to_numpy(), model.predict_proba(rows[[*names, "site"]])[:, 1])
    with pytest.raises(InputRefused, match="missing 1 of the 61 columns the model reads: site"):
        loaded.predict(rows.drop(columns=["site"]))
    with pytest.raises(InputRefused, match="site\\(s\\) C .* were not in the training data"):
        loaded.predict(rows.assign(site="C"))


def test_tcp_nodelay_is_set_on_sockets_uvicorn_binds_with_proto_0(monkeypatch):
    """With `-w N` uvicorn's listening socket has proto 0 and asyncio would leave Nagle on."""
    import asyncio.base_events as base_events
    import socket

    from bonemet.registry.pyfunc import enable_tcp_nodelay

    monkeypatch.setattr(base_events, "_set_nodelay", base_events._set_nodelay)  # restored after the test
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0) as sock:
        base_events._set_nodelay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # the stall of uvicorn #3149
        enable_tcp_nodelay()
        base_events._set_nodelay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def _split_bodies(count: int, seed: int) -> list[dict]:
    """``dataframe_split`` bodies as ``json.loads`` gives them: floats, integers, null, NaN, text,
    booleans, columns mixing them, in shuffled column orders."""
    rng = np.random.default_rng(seed)
    makers = {"float": lambda: float(rng.normal(scale=1e4)), "int": lambda: int(rng.integers(-5, 5)),
              "null": lambda: None, "nan": lambda: float("nan"), "text": lambda: str(rng.choice(["a", "", "b"])),
              "bool": lambda: bool(rng.random() < 0.5)}
    kinds = [*makers, "float", "float", "mixed"]
    bodies = []
    for _ in range(count):
        n_cols, n_rows = int(rng.integers(1, 10)), int(rng.integers(1, 4))
        column_kinds = [str(rng.choice(kinds)) for _ in range(n_cols)]
        data = [[makers[str(rng.choice(["float", "int", "null"]))]() if k == "mixed" else makers[k]()
                 for k in column_kinds] for _ in range(n_rows)]
        columns = [f"c{j}" for j in rng.permutation(n_cols)]
        bodies.append(json.loads(json.dumps({"columns": columns, "data": data})))
    return bodies


def test_request_frames_built_in_bulk_equal_pandas_own():
    from bonemet.registry.pyfunc import split_frame

    built = 0
    for body in _split_bodies(600, seed=0):
        fast = split_frame(body)
        if fast is None:  # no column of floats only: pandas builds it
            assert not any(all(type(row[j]) is float for row in body["data"]) for j in range(len(body["columns"])))
            continue
        built += 1
        reference = pd.DataFrame(columns=body["columns"], data=body["data"])
        pd.testing.assert_frame_equal(fast, reference, check_exact=True, check_index_type=True,
                                      check_column_type=True)
        assert list(fast.dtypes) == list(reference.dtypes) and type(fast.index) is type(reference.index)
    assert built > 300
    # shapes it leaves to pandas: an index, ragged rows, repeated or non-text names
    for body in ({"columns": ["a"], "data": [[1.0]], "index": [7]}, {"columns": ["a", "b"], "data": [[1.0]]},
                 {"columns": ["a", "a"], "data": [[1.0, 2.0]]}, {"columns": [1], "data": [[1.0]]},
                 {"data": [[1.0]]}, [[1.0]]):
        assert split_frame(body) is None


def test_the_server_parses_requests_faster_with_the_same_results(monkeypatch):
    """orjson for the body, the bulk frame for dataframe_split; other shapes go to MLflow's code."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    from bonemet.registry.pyfunc import enable_fast_request_parsing

    for name in ("dataframe_from_parsed_json", "_decode_json_input"):  # restored after the test
        monkeypatch.setattr(scoring_server, name, getattr(scoring_server, name))
    original, decode = scoring_server.dataframe_from_parsed_json, scoring_server._decode_json_input
    enable_fast_request_parsing()
    enable_fast_request_parsing()  # once is enough: not wrapped twice
    patched = scoring_server.dataframe_from_parsed_json
    assert patched is not original and patched.bonemet_fast and scoring_server._decode_json_input.bonemet_fast
    # JSON: the same dict as json.loads, including what orjson refuses and MLflow's own errors
    texts = ['{"a": [1.5, 2, null, "x", true], "b": {"c": -0.0}}', '{"a": NaN, "b": Infinity}',
             '{"a": 123456789012345678901234567890}', '{"a": 1, "a": 2}', '{"a": "\\ud800"}', '{"a": 1e400}']
    for text in texts:
        for body in (text, text.encode(), text.encode("utf-16")):
            got, expected = scoring_server._decode_json_input(body), decode(body)
            assert repr(got) == repr(expected), body
    for split in _split_bodies(100, seed=1):
        body = json.dumps({"dataframe_split": split, "params": {"threshold": 0.5}}).encode()
        assert repr(scoring_server._decode_json_input(body)) == repr(decode(body))
    for bad in (b"[1, 2]", b"{", b"\xff"):
        with pytest.raises(MlflowException) as ours:
            scoring_server._decode_json_input(bad)
        with pytest.raises(MlflowException) as theirs:
            decode(bad)
        assert ours.value.message == theirs.value.message
    body = {"columns": ["case_id", "x", "y"], "data": [["c1", 1.5, 2.0], ["c2", 0.5, float("nan")]]}
    frame = scoring_server.infer_and_parse_data({"dataframe_split": body})
    pd.testing.assert_frame_equal(frame, original(body, "split"), check_exact=True)
    assert list(frame.dtypes.astype(str))[1:] == ["float64", "float64"]
    records = scoring_server.infer_and_parse_data({"dataframe_records": [{"x": 1.0}]})
    assert records["x"].tolist() == [1.0]
    with_index = scoring_server.infer_and_parse_data({"dataframe_split": {**body, "index": [5, 6]}})
    assert with_index.index.tolist() == [5, 6]
