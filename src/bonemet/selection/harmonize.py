"""ComBat harmonisation of radiomic features across sites (centres, scanners, protocols).

Radiomic features move with the scanner: noise, reconstruction kernel, slice thickness and HU
calibration shift and scale them site by site. ComBat (Johnson et al., Biostatistics 2007;
for imaging Fortin et al., NeuroImage 2018; for radiomics Orlhac et al., J Nucl Med 2019)
models each feature as a pooled mean plus an additive and a multiplicative site effect, with
empirical-Bayes priors pooled over features, and removes the site effects.

:class:`ComBatHarmonizer` is the first step of the classification pipeline (params
``select.harmonize``), so it is fitted on the training rows of each fold only. Fitting uses
neuroCombat (0.2.12, by ComBat-for-imaging's authors; neuroHarmonize 2.5.2 builds on exactly this
version, and itself cannot be installed beside NumPy 2). Applying the learned estimates to new
rows is the few lines of ``neuroCombatFromTraining`` written out here, because that function
fails on NumPy >= 2 (it converts a one-element array with ``int()``); a test checks that our
transform of the training rows equals neuroCombat's own harmonised output.

Input layout: a DataFrame whose column ``site_column`` (``site``, from the manifest) names each
row's site, and whose other columns are numeric features: the primary source's and, during
training, the ``paired__`` columns the ICC filter needs (harmonised as features of their own: a
site shifts both masks' values). ``transform`` drops the site column and accepts frames with any
subset of the fitted features (a served row has no ``paired__`` columns).

At prediction time a row must name a site that was in the training rows: a missing site column,
an empty site or an unseen site is a :class:`SiteError` naming the rows and the known sites
(ComBat has no estimate for a site it never saw; passing such a row through unadjusted would
give it the scale of its own scanner, not of the training data, silently).
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from bonemet.errors import UserError
from bonemet.utils import some

log = logging.getLogger(__name__)

#: ComBat estimates a variance per site: a site needs at least this many training rows.
MIN_ROWS_PER_SITE = 2


class SiteError(UserError, ValueError):
    """Rows without a usable site for harmonisation (missing column, empty, unseen or too few)."""


class ComBatHarmonizer(TransformerMixin, BaseEstimator, auto_wrap_output_keys=None):
    """Remove per-site location and scale effects of every feature (ComBat).

    Parameters
    ----------
    site_column : str
        Column naming each row's site (dropped from the output).
    parametric : bool
        Parametric empirical-Bayes priors (the usual ComBat); False: non-parametric (slower).
    mean_only : bool
        Adjust only each site's mean, not its variance.

    Attributes
    ----------
    feature_names_in_ : ndarray of str
        The feature columns seen in ``fit`` (the site column excluded).
    sites_ : ndarray of str
        The training sites, in the order of the rows of ``gamma_`` and ``delta_``.
    mean_ : ndarray (n_features,)
        Pooled mean of each feature.
    var_ : ndarray (n_features,)
        Pooled residual variance of each feature.
    gamma_ : ndarray (n_sites, n_features)
        Additive site effects (in pooled-sd units), after empirical Bayes.
    delta_ : ndarray (n_sites, n_features)
        Multiplicative site effects (variance ratios), after empirical Bayes.
    """

    def __init__(self, *, site_column: str, parametric: bool, mean_only: bool) -> None:
        self.site_column = site_column
        self.parametric = parametric
        self.mean_only = mean_only

    # --- pandas output is the input's layout (no column renaming by set_output) ---------
    def set_output(self, *, transform=None):
        """Accepted for ``Pipeline.set_output``: the output is always a DataFrame like the input."""
        return self

    def _split(self, X, where: str) -> tuple[pd.Series, pd.DataFrame]:
        if not isinstance(X, pd.DataFrame):
            raise SiteError(f"{where}: harmonisation needs a table with a '{self.site_column}' column, "
                            f"got {type(X).__name__}")
        if self.site_column not in X.columns:
            raise SiteError(
                f"{where}: no '{self.site_column}' column; the model harmonises features per site "
                f"(select.harmonize), so every row must name its site"
                + (f" (one of {some(self.sites_)})" if hasattr(self, "sites_") else "")
            )
        raw = X[self.site_column]
        sites = raw.astype("string").str.strip()
        empty = sites.isna() | (sites == "")
        if empty.any():
            raise SiteError(f"{where}: empty '{self.site_column}' at row(s) {some(X.index[empty])}: "
                            "give every case its site")
        features = X.drop(columns=[self.site_column])
        return sites.astype(str), features

    def fit(self, X, y=None):
        """Estimate each site's effects on every feature from these (training) rows."""
        from neuroCombat import neuroCombat

        sites, features = self._split(X, "ComBatHarmonizer.fit")
        values = features.to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("ComBatHarmonizer.fit: NaN or infinite feature values")
        counts = sites.value_counts()
        few = counts[counts < MIN_ROWS_PER_SITE]
        if len(few):
            raise SiteError(
                f"site(s) {some(f'{s} ({n} case)' for s, n in few.items())} have fewer than {MIN_ROWS_PER_SITE} "
                "training cases in this fold; ComBat estimates a variance per site: merge small sites "
                "or turn select.harmonize off"
            )
        self.feature_names_in_ = np.asarray([str(c) for c in features.columns], dtype=object)
        self.n_features_in_ = len(self.feature_names_in_)
        n_features = values.shape[1]
        if counts.size == 1:  # one site: nothing to remove
            log.warning("ComBatHarmonizer: the training rows come from one site (%s); harmonisation is the "
                        "identity", counts.index[0])
            self.sites_ = np.asarray([str(counts.index[0])], dtype=object)
            self.mean_ = values.mean(axis=0)
            self.var_ = np.ones(n_features)
            self.gamma_ = np.zeros((1, n_features))
            self.delta_ = np.ones((1, n_features))
            return self
        covars = pd.DataFrame({"site": sites.to_numpy(dtype=object)})
        with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):  # it prints its progress
            result = neuroCombat(dat=values.T, covars=covars, batch_col="site", eb=True,
                                 parametric=bool(self.parametric), mean_only=bool(self.mean_only))
        est = result["estimates"]
        self.sites_ = np.asarray([str(s) for s in est["batches"]], dtype=object)
        self.mean_ = np.asarray(est["stand.mean"], dtype=np.float64)[:, 0]
        self.var_ = np.asarray(est["var.pooled"], dtype=np.float64).reshape(-1)
        self.gamma_ = np.asarray(est["gamma.star"], dtype=np.float64).reshape(len(self.sites_), n_features)
        self.delta_ = np.asarray(est["delta.star"], dtype=np.float64).reshape(len(self.sites_), n_features)
        # A feature whose estimates are not finite (e.g. constant within a site) is left as it is.
        bad = ~(np.isfinite(self.gamma_).all(axis=0) & np.isfinite(self.delta_).all(axis=0)
                & (self.delta_ > 0).all(axis=0) & np.isfinite(self.var_) & (self.var_ > 0))
        if bad.any():
            log.info("ComBatHarmonizer: %d of %d features left unadjusted (no finite site estimates)",
                     int(bad.sum()), n_features)
            self.gamma_[:, bad] = 0.0
            self.delta_[:, bad] = 1.0
            self.var_[bad] = 1.0
        return self

    def transform(self, X):
        """The features with each row's site effects removed (site column dropped).

        Raises:
            SiteError: no site column, an empty site, or a site not seen in ``fit``.
        """
        check_is_fitted(self, "gamma_")
        sites, features = self._split(X, "harmonisation")
        known = {s: i for i, s in enumerate(self.sites_)}
        unseen = ~sites.isin(list(known))
        if unseen.any():
            found = sorted(set(sites[unseen]))
            raise SiteError(
                f"site(s) {some(found)} at row(s) {some(X.index[unseen])} were not in the training data "
                f"(sites {some(self.sites_)}); ComBat cannot adjust a site it never saw: predict these rows "
                "with a model trained on their site, or one trained with select.harmonize off"
            )
        position = {name: j for j, name in enumerate(self.feature_names_in_)}
        unknown = [str(c) for c in features.columns if str(c) not in position]
        if unknown:
            raise ValueError(f"harmonisation: columns not seen in fit: {some(unknown)}")
        cols = np.asarray([position[str(c)] for c in features.columns], dtype=int)
        rows = np.asarray([known[s] for s in sites], dtype=int)
        values = features.to_numpy(dtype=np.float64)
        mean, sd = self.mean_[cols], np.sqrt(self.var_[cols])
        standardised = (values - mean) / sd
        adjusted = (standardised - self.gamma_[rows][:, cols]) / np.sqrt(self.delta_[rows][:, cols])
        return pd.DataFrame(adjusted * sd + mean, index=features.index, columns=features.columns)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """The fitted feature columns (the site column is dropped)."""
        check_is_fitted(self, "feature_names_in_")
        return np.asarray(self.feature_names_in_, dtype=object)
