r"""K-component Gaussian mixture (diagonal covariances) on scikit-learn's iris data.

Features: petal length and petal width (columns 2, 3) by default, or all four with
``data(all_features=True)``; standardized to zero mean / unit variance.  K = 3.
The discrete assignments z_n are marginalized out (``MixtureSameFamily``), so every
latent site is continuous:

.. math::

    w &\sim \mathrm{Dirichlet}(\mathbf{1}_K) \\
    \mu_k &\sim \mathcal{N}(0, 3 I_D), \quad k = 1..K \quad (\text{plate "component"}) \\
    s_{kd} &\sim \mathrm{HalfNormal}(2) \\
    x_n &\sim \textstyle\sum_k w_k\, \mathcal{N}(\mu_k, \mathrm{diag}(s_k^2)), \quad n = 1..N
        \quad (\text{plate "data"}) \\
    &\text{i.e. } p(x_n \mid \cdot) = \mathrm{logsumexp}_k
        \big[\log w_k + \log \mathcal{N}(x_n; \mu_k, \mathrm{diag}(s_k^2))\big]

Latent sites: ``weights`` (K,) simplex, ``locs`` (K, D), ``scales`` (K, D) positive.
The posterior is K!-fold multimodal (label switching) -- there is no NUTS reference.
Call as ``model(X=X, K=3)``; ``data()`` returns ``((), {"X": X})`` (X: (150, D) float32).
``component_log_likelihood`` and ``responsibilities`` are the E-step pieces for EM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

K = 3
FEATURES = (2, 3)


def model(X=None, K: int = K, n: int = 150, d: int = len(FEATURES)):
    if X is not None:
        n, d = X.shape
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(K)))
    with numpyro.plate("component", K):
        locs = numpyro.sample("locs", dist.Normal(jnp.zeros(d), 3.0).to_event(1))
        scales = numpyro.sample("scales", dist.HalfNormal(2.0 * jnp.ones(d)).to_event(1))
    mix = dist.MixtureSameFamily(
        dist.Categorical(probs=weights), dist.Normal(locs, scales).to_event(1)
    )
    with numpyro.plate("data", n):
        numpyro.sample("X", mix, obs=X)


def component_log_likelihood(X, weights, locs, scales):
    """``log w_k + log N(x_n; mu_k, diag(s_k^2))`` as an (N, K) array."""
    lp = dist.Normal(locs[None, :, :], scales[None, :, :]).log_prob(X[:, None, :]).sum(-1)
    return jnp.log(weights)[None, :] + lp


def responsibilities(X, weights, locs, scales):
    """Posterior assignment probabilities p(z_n = k | x_n, params), shape (N, K)."""
    return jax.nn.softmax(component_log_likelihood(X, weights, locs, scales), axis=-1)


def load_iris_features(all_features: bool = False) -> np.ndarray:
    from sklearn.datasets import load_iris

    X = np.asarray(load_iris().data, dtype=np.float64)
    if not all_features:
        X = X[:, list(FEATURES)]
    return ((X - X.mean(axis=0)) / X.std(axis=0)).astype(np.float32)


def data(all_features: bool = False) -> tuple[tuple, dict]:
    return (), {"X": jnp.asarray(load_iris_features(all_features))}
