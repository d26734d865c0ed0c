r"""Eight schools, non-centered parameterization (Rubin 1981; Gelman et al., BDA3 5.5).

.. math::

    \mu &\sim \mathcal{N}(0, 5) \\
    \tau &\sim \mathrm{HalfCauchy}(5) \\
    \tilde\theta_j &\sim \mathcal{N}(0, 1), \quad j = 1..8 \quad (\text{plate "school"}) \\
    \theta_j &= \mu + \tau \tilde\theta_j \quad (\text{deterministic site "theta"}) \\
    y_j &\sim \mathcal{N}(\theta_j, \sigma_j) \quad (\sigma_j \text{ known})

Latent sites: ``mu`` (), ``tau`` () (positive), ``theta_tilde`` (8,).
Call as ``model(sigma, y=y)``; ``data()`` returns ``((sigma,), {"y": y})``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

J = 8
Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)


def model(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def data() -> tuple[tuple, dict]:
    sigma = jnp.asarray(SIGMA, dtype=jnp.float32)
    y = jnp.asarray(Y, dtype=jnp.float32)
    return (sigma,), {"y": y}
