r"""Neal's funnel in 2-D (Neal 2003) -- a hard geometry for VI and HMC diagnostics.

.. math::

    v &\sim \mathcal{N}(0, 3) \\
    x &\sim \mathcal{N}(0, e^{v/2})

Latent sites: ``v`` (), ``x`` () (``x`` has shape (dim,) if ``model(dim=...)`` is given).
No data: ``data()`` returns ``((), {})``.
Exact moments: v has mean 0, sd 3; x has mean 0 and sd sqrt(E[e^v]) = e^{9/4} ~= 9.49.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

V_SCALE = 3.0


def model(dim: int | None = None):
    v = numpyro.sample("v", dist.Normal(0.0, V_SCALE))
    scale = jnp.exp(v / 2.0)
    if dim is None:
        numpyro.sample("x", dist.Normal(0.0, scale))
    else:
        numpyro.sample("x", dist.Normal(jnp.zeros(dim), scale).to_event(1))


def data() -> tuple[tuple, dict]:
    return (), {}


def posterior_moments(dim: int | None = None) -> dict:
    """Exact marginal mean and sd of ``v`` and ``x``."""
    shape = () if dim is None else (dim,)
    sd_x = np.exp(V_SCALE**2 / 4.0)  # sqrt(E[exp(v)]) with v ~ N(0, 3^2)
    return {
        "v": {"mean": np.asarray(0.0), "sd": np.asarray(V_SCALE)},
        "x": {"mean": np.zeros(shape), "sd": np.full(shape, sd_x)},
    }
