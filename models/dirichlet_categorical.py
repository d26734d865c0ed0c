r"""Dirichlet-Categorical (conjugate), 4 categories.

.. math::

    \pi &\sim \mathrm{Dirichlet}(\alpha), \qquad \alpha = (1, 1, 1, 1) \\
    y_i &\sim \mathrm{Categorical}(\pi), \quad i = 1..50 \quad (\text{plate "data"}) \\
    \pi \mid y &\sim \mathrm{Dirichlet}(\alpha + c), \qquad c_k = \#\{i : y_i = k\}

Latent site: ``pi`` (4,) on the simplex.  Call as ``model(y=y)``; ``data()`` returns
``((), {"y": y})`` with ``y`` an int32 array (counts 20, 15, 10, 5).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

K = 4
ALPHA = (1.0, 1.0, 1.0, 1.0)
COUNTS = (20, 15, 10, 5)
N = sum(COUNTS)


def model(y=None, alpha=None, n: int = N):
    alpha = jnp.asarray(ALPHA if alpha is None else alpha, dtype=jnp.float32)
    pi = numpyro.sample("pi", dist.Dirichlet(alpha))
    with numpyro.plate("data", n if y is None else y.shape[0]):
        numpyro.sample("y", dist.Categorical(probs=pi), obs=y)


def _y() -> np.ndarray:
    y = np.repeat(np.arange(K), COUNTS)
    return np.random.RandomState(0).permutation(y).astype(np.int32)


def data() -> tuple[tuple, dict]:
    return (), {"y": jnp.asarray(_y())}


def exact_posterior(y=None, alpha=None, **_) -> dict:
    """Closed-form posterior ``{"pi": {"concentration": alpha + counts}}``."""
    y = np.asarray(_y() if y is None else y).astype(np.int64)
    alpha = np.asarray(ALPHA if alpha is None else alpha, dtype=np.float64)
    counts = np.bincount(y, minlength=alpha.size).astype(np.float64)
    return {"pi": {"concentration": alpha + counts}}


def posterior_moments(*args, **kwargs) -> dict:
    """Exact posterior mean and marginal sd of each component of ``pi``."""
    c = exact_posterior(*args, **kwargs)["pi"]["concentration"]
    c0 = c.sum()
    mean = c / c0
    var = c * (c0 - c) / (c0**2 * (c0 + 1.0))
    return {"pi": {"mean": mean, "sd": np.sqrt(var)}}
