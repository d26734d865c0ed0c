r"""Normal-Normal with known observation noise (conjugate).

.. math::

    \mu &\sim \mathcal{N}(m_0, s_0), \qquad m_0 = 0,\ s_0 = 10 \\
    y_i &\sim \mathcal{N}(\mu, \sigma), \quad \sigma = 2 \text{ known},\ i = 1..20
        \quad (\text{plate "data"}) \\
    \mu \mid y &\sim \mathcal{N}(m_n, s_n), \qquad
        s_n^{-2} = s_0^{-2} + n \sigma^{-2}, \quad
        m_n = s_n^2 \big(m_0 s_0^{-2} + \textstyle\sum_i y_i\, \sigma^{-2}\big)

Latent site: ``mu`` ().  Call as ``model(y=y, m0=0., s0=10., sigma=2.)``;
``data()`` returns ``((), {"y": y})`` (20 draws from N(1.5, 2), fixed seed).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

M0, S0, SIGMA = 0.0, 10.0, 2.0
N = 20
SEED = 1


def model(y=None, m0: float = M0, s0: float = S0, sigma: float = SIGMA, n: int = N):
    mu = numpyro.sample("mu", dist.Normal(m0, s0))
    with numpyro.plate("data", n if y is None else y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def _y() -> np.ndarray:
    return (1.5 + SIGMA * np.random.RandomState(SEED).randn(N)).astype(np.float32)


def data() -> tuple[tuple, dict]:
    return (), {"y": jnp.asarray(_y())}


def exact_posterior(y=None, m0: float = M0, s0: float = S0, sigma: float = SIGMA, **_) -> dict:
    """Closed-form posterior ``{"mu": {"loc": m_n, "scale": s_n}}``."""
    y = np.asarray(_y() if y is None else y, dtype=np.float64)
    prec = 1.0 / s0**2 + y.size / sigma**2
    loc = (m0 / s0**2 + y.sum() / sigma**2) / prec
    return {"mu": {"loc": float(loc), "scale": float(np.sqrt(1.0 / prec))}}


def posterior_moments(*args, **kwargs) -> dict:
    """Exact posterior ``{"mu": {"mean": ..., "sd": ...}}``."""
    post = exact_posterior(*args, **kwargs)["mu"]
    return {"mu": {"mean": np.asarray(post["loc"]), "sd": np.asarray(post["scale"])}}
