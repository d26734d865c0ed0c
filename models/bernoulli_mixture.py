r"""Mixture of Bernoullis on binarized scikit-learn digits (Bishop 2006, Sec. 9.3.3).

.. math::

    w &\sim \mathrm{Dirichlet}(\mathbf{1}_K), \quad
    p_{kd} \sim \mathrm{Beta}(a, b) \quad (\text{plates "component" x "pixel"}) \\
    x_n &\sim \textstyle\sum_k w_k \prod_d \mathrm{Bernoulli}(x_{nd}; p_{kd}),
        \quad n = 1..N \quad (\text{plate "data"})

The assignments are marginalised (``MixtureSameFamily``). ``ngvi.em.fit_bernoulli_mixture``
is MAP-EM for this model (``beta_prior=(a, b)``, default ``(2, 2)``: Laplace smoothing).
Data: the first ``n`` (default 500) 8x8 digits, pixels ``> 7`` (of 0..16) set to 1, as an
``(n, 64)`` float array. Latent sites: ``weights (K,)``, ``probs (K, 64)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

K = 10
BETA_PRIOR = (2.0, 2.0)


def model(X=None, K: int = K, n: int = 500, d: int = 64, beta_prior=BETA_PRIOR):
    if X is not None:
        n, d = X.shape
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(K)))
    with numpyro.plate("component", K, dim=-2), numpyro.plate("pixel", d, dim=-1):
        probs = numpyro.sample("probs", dist.Beta(*beta_prior))
    mix = dist.MixtureSameFamily(
        dist.Categorical(probs=weights), dist.Bernoulli(probs=probs).to_event(1)
    )
    with numpyro.plate("data", n):
        numpyro.sample("X", mix, obs=X)


def component_log_likelihood(X, weights, probs):
    """``log w_k + sum_d [x log p_kd + (1 - x) log(1 - p_kd)]`` as an (N, K) array."""
    lp = X @ jnp.log(probs).T + (1.0 - X) @ jnp.log1p(-probs).T
    return jnp.log(weights)[None, :] + lp


def responsibilities(X, weights, probs):
    """Posterior assignment probabilities ``p(z_n = k | x_n, params)``, shape (N, K)."""
    return jax.nn.softmax(component_log_likelihood(X, weights, probs), axis=-1)


def load_binary_digits(n: int = 500, threshold: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, labels)``: the first ``n`` digits binarized at ``threshold``; X is (n, 64) float."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = (np.asarray(digits.data[:n]) > threshold).astype(np.float64)
    return X, np.asarray(digits.target[:n])


def data(n: int = 500) -> tuple[tuple, dict]:
    return (), {"X": jnp.asarray(load_binary_digits(n)[0], dtype=jnp.float32)}
