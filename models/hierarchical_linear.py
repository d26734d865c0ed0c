r"""Centered hierarchical linear regression with varying intercepts and slopes.

Synthetic data: 50 groups x 10 rows, generated from ``numpy.random.RandomState(SEED)``
with true values mu_a=1.0, mu_b=-0.5, sigma_a=0.8, sigma_b=0.5, sigma_y=0.5 and
x ~ N(0, 1).

.. math::

    \mu_a, \mu_b &\sim \mathcal{N}(0, 5) \\
    \sigma_a, \sigma_b &\sim \mathrm{HalfNormal}(1) \\
    a_g &\sim \mathcal{N}(\mu_a, \sigma_a), \quad
    b_g \sim \mathcal{N}(\mu_b, \sigma_b), \quad g = 1..50 \quad (\text{plate "group"}) \\
    \sigma_y &\sim \mathrm{HalfNormal}(1) \\
    y_n &\sim \mathcal{N}(a_{g[n]} + b_{g[n]} x_n, \sigma_y), \quad n = 1..500
        \quad (\text{plate "data"})

Latent sites: ``mu_a``, ``mu_b``, ``sigma_a``, ``sigma_b``, ``sigma_y`` (all scalar),
``a`` (50,), ``b`` (50,) -- 105 latent dimensions.
Call as ``model(x, group, y=y)``; ``data()`` returns ``((x, group), {"y": y})``
(``group`` is an int32 array of group indices).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

N_GROUPS = 50
ROWS_PER_GROUP = 10
SEED = 20240607
TRUE = {"mu_a": 1.0, "mu_b": -0.5, "sigma_a": 0.8, "sigma_b": 0.5, "sigma_y": 0.5}


def model(x, group, y=None, n_groups: int = N_GROUPS):
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 5.0))
    mu_b = numpyro.sample("mu_b", dist.Normal(0.0, 5.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0))
    sigma_b = numpyro.sample("sigma_b", dist.HalfNormal(1.0))
    with numpyro.plate("group", n_groups):
        a = numpyro.sample("a", dist.Normal(mu_a, sigma_a))
        b = numpyro.sample("b", dist.Normal(mu_b, sigma_b))
    sigma_y = numpyro.sample("sigma_y", dist.HalfNormal(1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(a[group] + b[group] * x, sigma_y), obs=y)


@functools.lru_cache(maxsize=1)
def _generate() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.RandomState(SEED)
    a = TRUE["mu_a"] + TRUE["sigma_a"] * rng.randn(N_GROUPS)
    b = TRUE["mu_b"] + TRUE["sigma_b"] * rng.randn(N_GROUPS)
    group = np.repeat(np.arange(N_GROUPS), ROWS_PER_GROUP)
    x = rng.randn(group.size)
    y = a[group] + b[group] * x + TRUE["sigma_y"] * rng.randn(group.size)
    return x.astype(np.float32), group.astype(np.int32), y.astype(np.float32)


def data() -> tuple[tuple, dict]:
    x, group, y = _generate()
    return (jnp.asarray(x), jnp.asarray(group)), {"y": jnp.asarray(y)}
