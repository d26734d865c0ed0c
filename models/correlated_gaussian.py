r"""Correlated 2-D Gaussian target (no data).

.. math::

    x \sim \mathcal{N}\!\left(0,\ \Sigma\right), \qquad
    \Sigma = 2 \begin{pmatrix} 1 & \rho \\ \rho & 1 \end{pmatrix}

The default ``rho = 0.5`` gives ``Sigma = [[2, 1], [1, 2]]``; ``model(rho=STRONG_RHO)``
(``rho = 0.95``) is the strongly correlated, ill-conditioned variant (condition number 39).

Latent site: ``x`` (2,).  ``data()`` returns ``((), {})``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

RHO = 0.5
STRONG_RHO = 0.95
VARIANCE = 2.0


def covariance(rho: float = RHO) -> np.ndarray:
    return VARIANCE * np.array([[1.0, rho], [rho, 1.0]])


def model(rho: float = RHO):
    cov = jnp.asarray(covariance(rho), dtype=jnp.float32)
    numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(2), covariance_matrix=cov))


def data() -> tuple[tuple, dict]:
    return (), {}


def exact_posterior(rho: float = RHO) -> dict:
    """The target itself: ``{"x": {"loc": zeros(2), "covariance_matrix": Sigma}}``."""
    return {"x": {"loc": np.zeros(2), "covariance_matrix": covariance(rho)}}


def posterior_moments(rho: float = RHO) -> dict:
    cov = covariance(rho)
    return {"x": {"mean": np.zeros(2), "sd": np.sqrt(np.diag(cov))}}
