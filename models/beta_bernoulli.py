r"""Beta-Bernoulli (conjugate).

.. math::

    p &\sim \mathrm{Beta}(2, 2) \\
    y_i &\sim \mathrm{Bernoulli}(p), \quad i = 1..20 \quad (\text{plate "data"}) \\
    p \mid y &\sim \mathrm{Beta}\big(2 + \textstyle\sum_i y_i,\; 2 + n - \sum_i y_i\big)

Latent site: ``p`` () in (0, 1).  Call as ``model(y=y)``; ``data()`` returns
``((), {"y": y})`` (14 ones out of 20).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

A0, B0 = 2.0, 2.0
Y = (1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1)
N = len(Y)


def model(y=None, n: int = N):
    p = numpyro.sample("p", dist.Beta(A0, B0))
    with numpyro.plate("data", n if y is None else y.shape[0]):
        numpyro.sample("y", dist.Bernoulli(probs=p), obs=y)


def data() -> tuple[tuple, dict]:
    return (), {"y": jnp.asarray(Y, dtype=jnp.float32)}


def exact_posterior(y=None, **_) -> dict:
    """Closed-form posterior ``{"p": {"concentration1": a, "concentration0": b}}``."""
    y = np.asarray(Y if y is None else y, dtype=np.float64)
    s, n = float(y.sum()), float(y.size)
    return {"p": {"concentration1": A0 + s, "concentration0": B0 + n - s}}


def posterior_moments(*args, **kwargs) -> dict:
    """Exact posterior ``{"p": {"mean": ..., "sd": ...}}``."""
    post = exact_posterior(*args, **kwargs)["p"]
    a, b = post["concentration1"], post["concentration0"]
    mean = a / (a + b)
    var = a * b / ((a + b) ** 2 * (a + b + 1.0))
    return {"p": {"mean": np.asarray(mean), "sd": np.sqrt(np.asarray(var))}}
