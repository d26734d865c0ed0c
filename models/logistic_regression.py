r"""Bayesian logistic regression on the Wisconsin breast-cancer data (scikit-learn bundle).

569 rows, 30 strongly correlated features, standardized to zero mean / unit variance
(so the posterior is correlated and moderately non-Gaussian; the classes are almost
separable, which the N(0, 1) weight prior keeps in check).

.. math::

    w &\sim \mathcal{N}(0, I_{30}) \\
    b &\sim \mathcal{N}(0, 5) \\
    y_n &\sim \mathrm{Bernoulli}(\mathrm{logit}^{-1}(x_n^\top w + b)), \quad n = 1..569
        \quad (\text{plate "data"})

Latent sites: ``w`` (30,), ``b`` ().
Call as ``model(X, y=y, subsample_size=None)``; ``subsample_size`` is passed to the
``"data"`` plate (NumPyro rescales the likelihood by N / subsample_size).
``data()`` returns ``((X,), {"y": y})`` with float32 arrays.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist


def model(X, y=None, subsample_size=None):
    n, d = X.shape
    w = numpyro.sample("w", dist.Normal(jnp.zeros(d), 1.0).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 5.0))
    with numpyro.plate("data", n, subsample_size=subsample_size) as idx:
        x_batch = X[idx] if subsample_size is not None else X
        y_batch = None if y is None else (y[idx] if subsample_size is not None else y)
        numpyro.sample("y", dist.Bernoulli(logits=x_batch @ w + b), obs=y_batch)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    bc = load_breast_cancer()
    X = np.asarray(bc.data, dtype=np.float64)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return X.astype(np.float32), np.asarray(bc.target, dtype=np.float32)


def data() -> tuple[tuple, dict]:
    X, y = _load()
    return (jnp.asarray(X),), {"y": jnp.asarray(y)}
