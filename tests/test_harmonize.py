"""ComBat harmonisation (select.harmonize): agreement with neuroCombat, site effects removed, fitted on
training rows only, unseen sites refused, and the whole train stage with harmonisation and patients."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest

from bonemet.modeling.persistence import load_pipeline, save_pipeline
from bonemet.modeling.pipeline import build_pipeline, build_selection_pipeline
from bonemet.selection.harmonize import ComBatHarmonizer, SiteError


def _sites_table(n_per_site=(25, 20, 15), p: int = 40, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Features on very different scales; site b adds 2 sd to every feature, site c scales by 1.6."""
    rng = np.random.default_rng(seed)
    sites = np.concatenate([[s] * n for s, n in zip("abc", n_per_site, strict=True)])
    scale = np.logspace(-3, 6, p)
    X = rng.normal(size=(len(sites), p)) * scale + 10 * scale
    X[sites == "b"] += 2 * scale
    X[sites == "c"] = (X[sites == "c"] - 10 * scale) * 1.6 + 10 * scale
    frame = pd.DataFrame(X, columns=[f"original_firstorder_F{i}" for i in range(p)],
                         index=[f"case{i:03d}" for i in range(len(sites))])
    frame["site"] = sites
    return frame, sites


def _combat(**kw) -> ComBatHarmonizer:
    return ComBatHarmonizer(site_column="site", parametric=kw.get("parametric", True),
                            mean_only=kw.get("mean_only", False))


@pytest.mark.parametrize("parametric,mean_only", [(True, False), (False, False), (True, True)])
def test_transform_of_the_training_rows_equals_neurocombat(parametric, mean_only):
    from neuroCombat import neuroCombat

    frame, sites = _sites_table()
    features = frame.drop(columns="site")
    out = _combat(parametric=parametric, mean_only=mean_only).fit(frame).transform(frame)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = neuroCombat(features.to_numpy().T, pd.DataFrame({"site": sites}), "site", parametric=parametric,
                          mean_only=mean_only)["data"].T
    assert list(out.columns) == list(features.columns) and (out.index == frame.index).all()
    np.testing.assert_allclose(out.to_numpy(), ref, rtol=1e-9, atol=0)


def test_site_effects_are_removed():
    frame, sites = _sites_table(n_per_site=(60, 60, 60), seed=1)
    raw = frame.drop(columns="site")
    out = _combat().fit(frame).transform(frame)
    for table, expect_gap in ((raw, True), (out, False)):
        z = (table - table.mean()) / table.std()
        gap = abs(z[sites == "b"].mean() - z[sites == "a"].mean()).mean()
        ratio = (table[sites == "c"].std() / table[sites == "a"].std()).mean()
        assert (gap > 1.0) if expect_gap else (gap < 0.1)
        assert (ratio > 1.4) if expect_gap else (abs(ratio - 1) < 0.1)


def test_fitted_on_training_rows_only_and_served_rows_need_no_paired_columns():
    frame, _ = _sites_table()
    train, test = frame.iloc[::2], frame.iloc[1::2]
    combat = _combat().fit(train)
    before = combat.transform(test)
    shifted = test.copy()
    shifted.iloc[:, :-1] *= 1000  # anything in the test rows: the estimates do not move
    combat.transform(shifted)
    np.testing.assert_array_equal(combat.transform(test).to_numpy(), before.to_numpy())
    assert combat.transform(test.iloc[:1]).equals(before.iloc[:1])  # one row alone: the same answer
    # a subset of the features (a served row has no paired__ columns) is harmonised the same way
    subset = test[["original_firstorder_F3", "original_firstorder_F7", "site"]]
    np.testing.assert_array_equal(combat.transform(subset).to_numpy(),
                                  before[["original_firstorder_F3", "original_firstorder_F7"]].to_numpy())


def test_rows_without_a_known_site_are_refused_with_the_fix():
    frame, _ = _sites_table()
    combat = _combat().fit(frame)
    with pytest.raises(SiteError, match=r"site\(s\) z at row\(s\) case000, case001 were not in the training data "
                                        r"\(sites a, b, c\)"):
        combat.transform(frame.iloc[:2].assign(site="z"))
    with pytest.raises(SiteError, match="no 'site' column.*one of a, b, c"):
        combat.transform(frame.drop(columns="site"))
    with pytest.raises(SiteError, match=r"empty 'site' at row\(s\) case000"):
        combat.transform(frame.iloc[:1].assign(site=""))
    with pytest.raises(SiteError, match=r"fewer than 2 training cases"):
        _combat().fit(frame.iloc[:26])  # site b has one row
    one_site = frame[frame["site"] == "a"]
    assert _combat().fit(one_site).transform(one_site).equals(one_site.drop(columns="site"))


def test_pipeline_with_harmonisation_fits_predicts_and_round_trips_with_skops(params, tmp_path):
    frame, sites = _sites_table(n_per_site=(30, 30, 30), p=12)
    rng = np.random.default_rng(3)
    y = (frame["original_firstorder_F0"].rank() / len(frame) + rng.normal(0, 0.3, len(frame)) > 0.5).astype(int)
    features = frame.drop(columns="site")
    X = pd.concat([features, features.add_prefix("paired__")], axis=1)
    X["site"] = sites
    select = params.select.updated({"harmonize.enabled": True, "lasso.max_features": 4, "lasso.cv": 3})
    assert build_selection_pipeline(select, 0).steps[0][0] == "harmonize"
    assert build_selection_pipeline(params.select, 0).steps[0][0] != "harmonize"  # off by default
    pipe = build_pipeline("logreg", {"C": 1.0, "solver": "saga", "max_iter": 5000}, select, 0).fit(X, y)
    served = frame.iloc[:5]  # primary features + site, no paired columns
    proba = pipe.predict_proba(served)[:, 1]
    path = save_pipeline(pipe, tmp_path / "model.skops")
    np.testing.assert_allclose(load_pipeline(path).predict_proba(served)[:, 1], proba)
    with pytest.raises(SiteError, match="no 'site' column"):
        pipe.predict_proba(features.iloc[:5])
