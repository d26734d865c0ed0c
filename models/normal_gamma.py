r"""Normal with unknown mean and precision under the Normal-Gamma prior (conjugate, not mean-field).

.. math::

    \tau &\sim \mathrm{Gamma}(a_0, b_0), \qquad a_0 = 2,\ b_0 = 2 \\
    \mu \mid \tau &\sim \mathcal{N}\big(m_0, (k_0 \tau)^{-1/2}\big), \qquad m_0 = 0,\ k_0 = 1 \\
    x_i &\sim \mathcal{N}(\mu, \tau^{-1/2}), \quad i = 1..20 \quad (\text{plate "data"})

The exact posterior is Normal-Gamma (``ngvi.families.NormalGamma``), with ``mu`` and ``tau``
dependent: ``k_n = k_0 + n``, ``m_n = (k_0 m_0 + n \bar x) / k_n``, ``a_n = a_0 + n/2``,
``b_n = b_0 + \frac12 \sum_i (x_i - \bar x)^2 + \frac{k_0 n (\bar x - m_0)^2}{2 k_n}``.

The mean-field family ``q(mu) q(tau)`` (Normal x Gamma) cannot represent it. Its optimum, the
CAVI fixed point, is closed form: ``q(mu) = N(m_n, (k_n E tau)^-1/2)``, ``q(tau) = Gamma(a_n +
1/2, b_n / (1 - 1 / (2 a_n + 1)))``. It has the exact ``E tau = a_n / b_n`` and ``E mu = m_n``
but no correlation, and ``Var mu = b_n / (k_n a_n)`` instead of the exact ``b_n / (k_n (a_n -
1))`` (the Student-t marginal).

Latent sites: ``mu`` () real, ``tau`` () positive. Call as ``model(x=x)``; ``data()`` returns
``((), {"x": x})`` (20 draws from N(1, 0.5), fixed seed).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

A0, B0, M0, K0 = 2.0, 2.0, 0.0, 1.0
N = 20
SEED = 3


def model(x=None, a0: float = A0, b0: float = B0, m0: float = M0, k0: float = K0, n: int = N):
    tau = numpyro.sample("tau", dist.Gamma(a0, b0))
    mu = numpyro.sample("mu", dist.Normal(m0, 1.0 / jnp.sqrt(k0 * tau)))
    with numpyro.plate("data", n if x is None else x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0 / jnp.sqrt(tau)), obs=x)


def _x() -> np.ndarray:
    return (1.0 + 0.5 * np.random.RandomState(SEED).randn(N)).astype(np.float32)


def data() -> tuple[tuple, dict]:
    return (), {"x": jnp.asarray(_x())}


def exact_posterior(x=None, a0=A0, b0=B0, m0=M0, k0=K0, **_) -> dict:
    """Closed-form posterior ``{("mu", "tau"): {"loc", "lam", "concentration", "rate"}}`` in
    ``ngvi.families.NormalGamma.from_standard`` order."""
    x = np.asarray(_x() if x is None else x, dtype=np.float64)
    n, xbar = x.size, float(x.mean())
    kn = k0 + n
    rate = b0 + 0.5 * float(((x - xbar) ** 2).sum()) + k0 * n * (xbar - m0) ** 2 / (2 * kn)
    post = {"loc": (k0 * m0 + n * xbar) / kn, "lam": kn, "concentration": a0 + n / 2}
    return {("mu", "tau"): post | {"rate": rate}}


def mean_field_optimum(*args, **kwargs) -> dict:
    """The CAVI fixed point (module docstring): ``{"mu": {"loc", "scale"}, "tau":
    {"concentration", "rate"}}``."""
    post = exact_posterior(*args, **kwargs)[("mu", "tau")]
    a = post["concentration"] + 0.5
    b = post["rate"] / (1.0 - 1.0 / (2.0 * a))
    scale = float(np.sqrt(b / (post["lam"] * a)))
    return {"mu": {"loc": post["loc"], "scale": scale}, "tau": {"concentration": a, "rate": b}}


def posterior_moments(*args, **kwargs) -> dict:
    """Exact marginal moments ``{"mu": {"mean", "sd"}, "tau": {"mean", "sd"}}``."""
    p = exact_posterior(*args, **kwargs)[("mu", "tau")]
    a, b = p["concentration"], p["rate"]
    return {
        "mu": {"mean": np.asarray(p["loc"]), "sd": np.asarray(np.sqrt(b / (p["lam"] * (a - 1))))},
        "tau": {"mean": np.asarray(a / b), "sd": np.asarray(np.sqrt(a) / b)},
    }
