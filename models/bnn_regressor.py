r"""Bayesian neural network regression on scikit-learn's diabetes data (bundled, no download).

442 patients, 10 features and the disease-progression target, all standardized with the
*training* mean and standard deviation; an 80/20 train/test split fixed by seed 0 (353 / 89).
One hidden layer (10-50-1, tanh) built with ``ngvi.nn.dense`` and a Gaussian likelihood with an
unknown noise scale:

.. math::

    W_1 &\sim \mathcal{N}(0, 1)^{10 \times 50},\; b_1 \sim \mathcal{N}(0, 1)^{50},\;
    W_2 \sim \mathcal{N}(0, 1)^{50 \times 1},\; b_2 \sim \mathcal{N}(0, 1) \\
    \sigma &\sim \mathrm{HalfNormal}(1) \\
    y_n &\sim \mathcal{N}(\tanh(x_n W_1 + b_1) W_2 + b_2, \sigma^2) \quad (\text{plate "data"})

Latent sites: ``hidden_w`` (10, 50), ``hidden_b`` (50,), ``out_w`` (50, 1), ``out_b`` (1,) and
``sigma`` () -- the one non-layer site (the K-FAC guide gives it a diagonal Gaussian).
Call as ``model(X, y=None, subsample_size=None, batch_idx=None)`` (see ``bnn_classifier``).
``data()`` returns the training set ``((X,), {"y": y})``, ``test_data()`` the test set.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ngvi.nn import data_plate, dense, minibatch

HIDDEN = 50


def model(X, y=None, subsample_size=None, batch_idx=None, hidden=HIDDEN, prior_scale=1.0):
    n = X.shape[0]
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    xb, yb = minibatch(X, y, subsample_size, batch_idx)
    h = jnp.tanh(dense("hidden", xb, hidden, prior_scale=prior_scale))
    mean = dense("out", h, 1, prior_scale=prior_scale)[..., 0]
    with data_plate(n, xb.shape[0], batch_idx):
        numpyro.sample("y", dist.Normal(mean, sigma), obs=yb)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    X, y = load_diabetes(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0)
    mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0)
    ym, ys = ytr.mean(), ytr.std()
    fx = lambda a: ((a - mu) / sd).astype(np.float32)
    fy = lambda a: ((a - ym) / ys).astype(np.float32)
    return fx(Xtr), fy(ytr), fx(Xte), fy(yte)


def data() -> tuple[tuple, dict]:
    X, y, _, _ = _load()
    return (jnp.asarray(X),), {"y": jnp.asarray(y)}


def test_data() -> tuple[tuple, dict]:
    _, _, X, y = _load()
    return (jnp.asarray(X),), {"y": jnp.asarray(y)}
