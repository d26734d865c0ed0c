r"""Bayesian Gaussian mixture with conjugate priors (diagonal precisions), for VB-EM and SVI.

.. math::

    \pi &\sim \mathrm{Dirichlet}(\alpha_0 \mathbf{1}_K) \\
    \tau_{kd} &\sim \mathrm{Gamma}(a_0, b_0), \quad
    \mu_{kd} \mid \tau_{kd} \sim \mathcal{N}(m_0, 1 / (\beta_0 \tau_{kd}))
        \quad (\text{plates "component" x "dim"}) \\
    x_n &\sim \textstyle\sum_k \pi_k \prod_d \mathcal{N}(\mu_{kd}, 1 / \tau_{kd}),
        \quad n = 1..N \quad (\text{plate "data"}, \text{optionally subsampled})

The assignments are marginalised (``MixtureSameFamily``). With
``subsample_size=B`` the data plate draws ``B`` of the ``N`` indices and NumPyro scales the
likelihood by ``N / B``: ``ngvi.em.fit_svi_gmm`` scales its minibatch statistics by that
scale (read from this plate); its minibatches are i.i.d. indices by default, O(B) per step,
or ``subsample="numpyro"`` draws them with this plate (O(N) per step). The prior is a
``ngvi.em.BayesGMMPrior`` (``alpha0, m0, beta0, a0, b0``). ``data()`` returns iris
(standardized petal length / width, as ``ngvi.models.gaussian_mixture``); ``synthetic(n,
key)`` draws a large well-separated data set.
Bishop (2006), Sec. 10.2; ``ngvi.em.NormalGamma`` is the conjugate family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from ngvi.em import BayesGMMPrior

from .gaussian_mixture import load_iris_features

K = 3
PRIOR = BayesGMMPrior(alpha0=1.0, m0=0.0, beta0=1.0, a0=1.0, b0=1.0)
#: component means / standard deviations of ``synthetic`` (K = 3, D = 2)
TRUE_LOCS = ((-3.0, 0.0), (3.0, 0.0), (0.0, 4.0))
TRUE_SCALES = ((1.0, 0.5), (0.7, 1.2), (1.5, 0.8))
TRUE_WEIGHTS = (0.5, 0.3, 0.2)


def model(X=None, K: int = K, n: int = 150, d: int = 2, subsample_size=None, prior=PRIOR):
    if X is not None:
        n, d = X.shape
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.full(K, prior.alpha0)))
    with numpyro.plate("component", K, dim=-2), numpyro.plate("dim", d, dim=-1):
        tau = numpyro.sample("tau", dist.Gamma(prior.a0, prior.b0))
        mu = numpyro.sample("mu", dist.Normal(prior.m0, 1.0 / jnp.sqrt(prior.beta0 * tau)))
    mix = dist.MixtureSameFamily(
        dist.Categorical(probs=weights), dist.Normal(mu, 1.0 / jnp.sqrt(tau)).to_event(1)
    )
    with numpyro.plate("data", n, subsample_size=subsample_size) as idx:
        numpyro.sample("X", mix, obs=None if X is None else X[idx])


def synthetic(n: int, key=None) -> jax.Array:
    """``n`` draws from a fixed 3-component diagonal mixture in 2-D (float64 under x64)."""
    key = jax.random.PRNGKey(0) if key is None else key
    k1, k2 = jax.random.split(key)
    z = jax.random.choice(k1, K, (n,), p=jnp.asarray(TRUE_WEIGHTS))
    eps = jax.random.normal(k2, (n, 2), dtype=jnp.result_type(float))
    return jnp.asarray(TRUE_LOCS)[z] + jnp.asarray(TRUE_SCALES)[z] * eps


def data() -> tuple[tuple, dict]:
    return (), {"X": jnp.asarray(load_iris_features())}
