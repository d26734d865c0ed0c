r"""Gamma-Poisson (conjugate), Gamma in shape/rate form.

.. math::

    \lambda &\sim \mathrm{Gamma}(a_0, b_0), \qquad a_0 = 2,\ b_0 = 0.5 \\
    y_i &\sim \mathrm{Poisson}(\lambda), \quad i = 1..20 \quad (\text{plate "data"}) \\
    \lambda \mid y &\sim \mathrm{Gamma}\big(a_0 + \textstyle\sum_i y_i,\; b_0 + n\big)

Latent site: ``lam`` () positive.  Call as ``model(y=y)``; ``data()`` returns
``((), {"y": y})`` with float32 counts.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

A0, B0 = 2.0, 0.5
Y = (3, 5, 2, 4, 6, 3, 1, 4, 5, 2, 3, 7, 4, 2, 3, 5, 4, 3, 6, 2)
N = len(Y)


def model(y=None, a0: float = A0, b0: float = B0, n: int = N):
    lam = numpyro.sample("lam", dist.Gamma(a0, b0))
    with numpyro.plate("data", n if y is None else y.shape[0]):
        numpyro.sample("y", dist.Poisson(lam), obs=y)


def data() -> tuple[tuple, dict]:
    return (), {"y": jnp.asarray(Y, dtype=jnp.float32)}


def exact_posterior(y=None, a0: float = A0, b0: float = B0, **_) -> dict:
    """Closed-form posterior ``{"lam": {"concentration": a, "rate": b}}``."""
    y = np.asarray(Y if y is None else y, dtype=np.float64)
    return {"lam": {"concentration": a0 + float(y.sum()), "rate": b0 + float(y.size)}}


def posterior_moments(*args, **kwargs) -> dict:
    """Exact posterior ``{"lam": {"mean": a / b, "sd": sqrt(a) / b}}``."""
    post = exact_posterior(*args, **kwargs)["lam"]
    a, b = post["concentration"], post["rate"]
    return {"lam": {"mean": np.asarray(a / b), "sd": np.asarray(np.sqrt(a) / b)}}
