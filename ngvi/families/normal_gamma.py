r"""The Normal-Gamma family: a joint exponential family over ``(mu, tau)``, not mean-field.

``tau ~ Gamma(a, b)`` (rate ``b``), ``mu | tau ~ Normal(m, (k tau)^-1/2)``; a draw is
``x = (mu, tau)`` (event shape ``(2,)``). It is the exact posterior of the Normal model with
unknown mean and precision under the conjugate prior of the same form:

    T(x)  = (tau mu, tau mu^2, tau, log tau),     h(x) = (2 pi)^-1/2,
    eta   = (k m, -k / 2, -(b + k m^2 / 2), a - 1/2),
    A     = log Gamma(a) - a log b - 1/2 log k,
    m_T   = E[T] = (a m / b, a m^2 / b + 1 / k, a / b, psi(a) - log b).

With ``s = 1/k``, ``t = E tau = a/b``, ``V = Var tau = a/b^2`` the Fisher ``Cov[T]`` follows from
the law of total covariance (``Var[mu | tau] = s / tau``):

    F = [[t s + m^2 V,  2 m s t + m^3 V,           m V,    m / b ],
         [.,            4 m^2 s t + 2 s^2 + m^4 V, m^2 V,  m^2 / b],
         [.,            .,                         V,      1 / b ],
         [.,            .,                         .,      psi'(a)]].

``fisher_inverse`` (undamped) is ``d eta / d m_T`` in closed form (chain rule through
``m = m_1 / m_3``, ``s = m_2 - m_1^2 / m_3`` and the Gamma block, whose ``da`` is
``(dm_3 / m_3 - dm_4) / (1/a - psi'(a))``); with damping it solves the closed-form 4x4 ``F +
damping I`` densely (no closed form for the damped inverse). ``mean_to_natural`` needs the Gamma
shape Newton solve of ``special``. Sampling is reparameterised (implicit for the Gamma draw,
location-scale for ``mu``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import digamma, gammaln
from numpyro.distributions import constraints

from .base import Array, ExpFamily, Params, is_static_zero
from .special import gamma_shape_from_log_ratio, trigamma

_LOG_2PI = math.log(2 * math.pi)


class _RealPositive(constraints._SingletonConstraint):
    """Pairs ``(mu, tau)`` with ``mu`` real and ``tau > 0``."""

    event_dim = 1

    def __call__(self, x):
        return jnp.isfinite(x[..., 0]) & (x[..., 1] > 0) & jnp.isfinite(x[..., 1])

    def feasible_like(self, prototype):
        return jnp.ones_like(prototype)


real_positive = _RealPositive()


@dataclasses.dataclass(frozen=True)
class NormalGamma(ExpFamily):
    """Normal-Gamma(``loc`` m, ``lam`` k, ``concentration`` a, ``rate`` b) over ``(mu, tau)``
    (module docstring)."""

    param_shapes = ((), (), (), ())
    event_shape = (2,)
    support = real_positive
    reparameterized = True

    @classmethod
    def from_standard(cls, loc: Array, lam: Array, concentration: Array, rate: Array) -> Params:
        m, k, a, b = jnp.broadcast_arrays(*map(jnp.asarray, (loc, lam, concentration, rate)))
        return (k * m, -0.5 * k, -(b + 0.5 * k * m**2), a - 0.5)

    def standard(self, eta: Params) -> tuple[Array, Array, Array, Array]:
        """``(loc, lam, concentration, rate)``."""
        k = -2.0 * eta[1]
        m = eta[0] / k
        return m, k, eta[3] + 0.5, -eta[2] - 0.5 * k * m**2

    def init(self, batch_shape: tuple[int, ...] = (), loc=0.0, lam=1.0, a=1.0, b=1.0) -> Params:
        full = lambda v: jnp.full(batch_shape, v)  # noqa: E731
        return self.from_standard(full(loc), full(lam), full(a), full(b))

    def log_partition(self, eta: Params) -> Array:
        _, k, a, b = self.standard(eta)
        return gammaln(a) - a * jnp.log(b) - 0.5 * jnp.log(k)

    def natural_to_mean(self, eta: Params) -> Params:
        m, k, a, b = self.standard(eta)
        t = a / b
        return (t * m, t * m**2 + 1.0 / k, t, digamma(a) - jnp.log(b))

    def mean_to_natural(self, mt: Params) -> Params:
        """``m = m_1/m_3``, ``1/k = m_2 - m_1^2/m_3``; ``(a, b)`` from the Gamma block (Newton)."""
        t = mt[2]
        m = mt[0] / t
        k = 1.0 / (mt[1] - mt[0] ** 2 / t)
        a = gamma_shape_from_log_ratio(jnp.log(t) - mt[3])
        return self.from_standard(m, k, a, a / t)

    def sufficient_stats(self, x: Array) -> Params:
        mu, tau = x[..., 0], x[..., 1]
        return (tau * mu, tau * mu**2, tau, jnp.log(tau))

    def log_base_measure(self, x: Array) -> Array:
        return jnp.full(jnp.shape(x)[:-1], -0.5 * _LOG_2PI)

    def fisher(self, eta: Params) -> Array:
        m, k, a, b = self.standard(eta)
        s, t, v = 1.0 / k, a / b, a / b**2
        rows = (
            (t * s + m**2 * v, 2 * m * s * t + m**3 * v, m * v, m / b),
            (None, 4 * m**2 * s * t + 2 * s**2 + m**4 * v, m**2 * v, m**2 / b),
            (None, None, v, 1.0 / b),
            (None, None, None, trigamma(a)),
        )
        entry = lambda i, j: rows[min(i, j)][max(i, j)]  # noqa: E731
        cols = [jnp.stack(jnp.broadcast_arrays(*(entry(i, j) for j in range(4))), -1)
                for i in range(4)]  # fmt: skip
        return jnp.stack(cols, -2)

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """``d eta / d m_T . v`` in closed form (module docstring); damped: dense 4x4 solve."""
        if not is_static_zero(damping):
            f = self.fisher(eta) + damping * jnp.eye(4, dtype=self.flatten(eta).dtype)
            return self.unflatten(jnp.linalg.solve(f, self.flatten(v)[..., None])[..., 0])
        m, k, a, b = self.standard(eta)
        t = a / b
        d1, d2, d3, d4 = v
        dm = (d1 - m * d3) / t
        dk = -(k**2) * (d2 - 2 * m * d1 + m**2 * d3)
        da = (d3 / t - d4) / (1.0 / a - trigamma(a))
        db = (da - b * d3) / t
        return (dk * m + k * dm, -0.5 * dk, -(db + 0.5 * dk * m**2 + k * m * dm), da)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        m, k, a, b = self.standard(eta)
        shape = tuple(sample_shape) + self.batch_shape(eta)
        k_tau, k_mu = jax.random.split(key)
        tau = jax.random.gamma(k_tau, a, shape, dtype=jnp.result_type(a)) / b
        mu = m + jax.random.normal(k_mu, shape, dtype=tau.dtype) / jnp.sqrt(k * tau)
        return jnp.stack([mu, tau], -1)

    def to_numpyro(self, eta: Params) -> NormalGammaDistribution:
        return NormalGammaDistribution(*self.standard(eta))


class NormalGammaDistribution(dist.Distribution):
    """``numpyro`` distribution of ``x = (mu, tau)``: ``tau ~ Gamma(a, b)``,
    ``mu | tau ~ Normal(loc, (lam tau)^-1/2)``."""

    arg_constraints = {
        "loc": constraints.real,
        "lam": constraints.positive,
        "concentration": constraints.positive,
        "rate": constraints.positive,
    }
    support = real_positive
    reparametrized_params = ["loc", "lam", "concentration", "rate"]

    def __init__(self, loc, lam, concentration, rate, *, validate_args=None):
        self.loc, self.lam, self.concentration, self.rate = jnp.broadcast_arrays(
            *map(jnp.asarray, (loc, lam, concentration, rate))
        )
        super().__init__(jnp.shape(self.loc), (2,), validate_args=validate_args)

    def _eta(self) -> Params:
        return NormalGamma.from_standard(self.loc, self.lam, self.concentration, self.rate)

    def sample(self, key, sample_shape=()):
        return NormalGamma().sample(key, self._eta(), sample_shape)

    def log_prob(self, value):
        return NormalGamma().log_prob(value, self._eta())

    @property
    def mean(self):
        return jnp.stack(jnp.broadcast_arrays(self.loc, self.concentration / self.rate), -1)
