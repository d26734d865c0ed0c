"""Gamma, Exponential, Beta and Dirichlet families.

Gradients through ``sample``: the Exponential is location-scale
(``x = E / rate``, ``E ~ Exp(1)``). ``jax.random.gamma`` (and ``beta`` /
``dirichlet``, which are built from Gamma draws) carry *implicit
reparameterisation* gradients ``dx/dalpha = -(dF/dalpha) / q(x)`` with ``F`` the
CDF (Figurnov, Mohamed & Mnih 2018), so ``jax.grad`` of a Monte Carlo
expectation with respect to ``eta`` is the unbiased pathwise estimator.

``mean_to_natural`` has no closed form for Gamma, Beta and Dirichlet: it calls
the fixed-iteration Newton solvers of ``special`` (Minka 2000, 2002).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import digamma, gammaln
from numpyro.distributions import constraints

from .base import Array, ExpFamily, Params, solve_sym_2x2, sym_2x2
from .special import (
    beta_icdf,
    dirichlet_fisher_solve,
    dirichlet_from_mean_log,
    gamma_icdf,
    gamma_shape_from_log_ratio,
    trigamma,
)


@dataclasses.dataclass(frozen=True)
class Gamma(ExpFamily):
    """Gamma(concentration ``a``, rate ``b``).

    ``T(x) = (log x, x)``, ``eta = (a - 1, -b)``, ``h = 1``,
    ``A = log Gamma(a) - a log b``, ``m = (psi(a) - log b, a / b)``,
    ``F = [[psi'(a), 1/b], [1/b, a/b^2]]``.
    """

    param_shapes = ((), ())
    event_shape = ()
    support = constraints.positive
    reparameterized = True  # implicit reparameterisation (jax.random.gamma)

    @classmethod
    def from_standard(cls, concentration: Array, rate: Array) -> Params:
        a, b = jnp.broadcast_arrays(jnp.asarray(concentration), jnp.asarray(rate))
        return (a - 1.0, -b)

    def standard(self, eta: Params) -> tuple[Array, Array]:
        """``(concentration, rate)``."""
        return eta[0] + 1.0, -eta[1]

    def init(self, batch_shape: tuple[int, ...] = (), concentration=1.0, rate=1.0) -> Params:
        return self.from_standard(jnp.full(batch_shape, concentration), jnp.full(batch_shape, rate))

    def log_partition(self, eta: Params) -> Array:
        a, b = self.standard(eta)
        return gammaln(a) - a * jnp.log(b)

    def natural_to_mean(self, eta: Params) -> Params:
        a, b = self.standard(eta)
        return (digamma(a) - jnp.log(b), a / b)

    def mean_to_natural(self, m: Params) -> Params:
        """``a`` solves ``log a - psi(a) = log E[x] - E[log x]`` (Newton); ``b = a / E[x]``."""
        a = gamma_shape_from_log_ratio(jnp.log(m[1]) - m[0])
        return self.from_standard(a, a / m[1])

    def sufficient_stats(self, x: Array) -> Params:
        return (jnp.log(x), x)

    def log_base_measure(self, x: Array) -> Array:
        return jnp.zeros(jnp.shape(x))

    def _fisher_entries(self, eta: Params) -> tuple[Array, Array, Array]:
        a, b = self.standard(eta)
        return trigamma(a), 1.0 / b, a / b**2

    def fisher(self, eta: Params) -> Array:
        return sym_2x2(*self._fisher_entries(eta))

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """Analytic 2x2 inverse of ``F + damping I``."""
        return solve_sym_2x2(*self._fisher_entries(eta), v, damping)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        a, b = self.standard(eta)
        shape = tuple(sample_shape) + self.batch_shape(eta)
        return jax.random.gamma(key, a, shape, dtype=jnp.result_type(a)) / b

    def to_numpyro(self, eta: Params) -> dist.Gamma:
        return dist.Gamma(*self.standard(eta))

    def marginal_icdf(self, eta: Params, q: Array) -> Array:
        return gamma_icdf(q, *self.standard(eta))


@dataclasses.dataclass(frozen=True)
class Exponential(ExpFamily):
    """Exponential(rate ``r``): ``T(x) = x``, ``eta = -r``, ``A = -log(-eta)``,
    ``m = 1 / r``, ``F = 1 / eta^2``, ``h = 1``. Location-scale reparameterised."""

    param_shapes = ((),)
    event_shape = ()
    support = constraints.positive
    reparameterized = True

    @classmethod
    def from_standard(cls, rate: Array) -> Params:
        return (-jnp.asarray(rate),)

    def standard(self, eta: Params) -> tuple[Array]:
        """``(rate,)``."""
        return (-eta[0],)

    def init(self, batch_shape: tuple[int, ...] = (), rate: float = 1.0) -> Params:
        return (jnp.full(batch_shape, -rate),)

    def log_partition(self, eta: Params) -> Array:
        return -jnp.log(-eta[0])

    def natural_to_mean(self, eta: Params) -> Params:
        return (-1.0 / eta[0],)

    def mean_to_natural(self, m: Params) -> Params:
        return (-1.0 / m[0],)

    def sufficient_stats(self, x: Array) -> Params:
        return (jnp.asarray(x),)

    def log_base_measure(self, x: Array) -> Array:
        return jnp.zeros(jnp.shape(x))

    def fisher(self, eta: Params) -> Array:
        return (1.0 / eta[0] ** 2)[..., None, None]

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """``v / (1 / eta^2 + damping)``."""
        return (v[0] / (1.0 / eta[0] ** 2 + damping),)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        shape = tuple(sample_shape) + self.batch_shape(eta)
        e = jax.random.exponential(key, shape, dtype=jnp.result_type(eta[0]))
        return e / (-eta[0])

    def to_numpyro(self, eta: Params) -> dist.Exponential:
        return dist.Exponential(-eta[0])

    def marginal_icdf(self, eta: Params, q: Array) -> Array:
        """``-log(1 - q) / rate``."""
        return -jnp.log1p(-q) / -eta[0]


@dataclasses.dataclass(frozen=True)
class Beta(ExpFamily):
    """Beta(``a``, ``b``) on (0, 1).

    ``T(x) = (log x, log(1 - x))``, ``eta = (a - 1, b - 1)``, ``h = 1``,
    ``A = log Gamma(a) + log Gamma(b) - log Gamma(a + b)``,
    ``m = (psi(a) - psi(a+b), psi(b) - psi(a+b))``,
    ``F = [[psi'(a) - psi'(a+b), -psi'(a+b)], [-psi'(a+b), psi'(b) - psi'(a+b)]]``.
    """

    param_shapes = ((), ())
    event_shape = ()
    support = constraints.unit_interval
    reparameterized = True  # implicit reparameterisation via Gamma draws

    @classmethod
    def from_standard(cls, concentration1: Array, concentration0: Array) -> Params:
        a, b = jnp.broadcast_arrays(jnp.asarray(concentration1), jnp.asarray(concentration0))
        return (a - 1.0, b - 1.0)

    def standard(self, eta: Params) -> tuple[Array, Array]:
        """``(concentration1, concentration0)`` as in ``numpyro.distributions.Beta``."""
        return eta[0] + 1.0, eta[1] + 1.0

    def init(self, batch_shape: tuple[int, ...] = (), a: float = 1.0, b: float = 1.0) -> Params:
        return self.from_standard(jnp.full(batch_shape, a), jnp.full(batch_shape, b))

    def log_partition(self, eta: Params) -> Array:
        a, b = self.standard(eta)
        return gammaln(a) + gammaln(b) - gammaln(a + b)

    def natural_to_mean(self, eta: Params) -> Params:
        a, b = self.standard(eta)
        psi_ab = digamma(a + b)
        return (digamma(a) - psi_ab, digamma(b) - psi_ab)

    def mean_to_natural(self, m: Params) -> Params:
        """Newton solve of the 2-class Dirichlet problem (Minka 2000)."""
        m1, m2 = jnp.broadcast_arrays(m[0], m[1])
        alpha = dirichlet_from_mean_log(jnp.stack([m1, m2], -1))
        return self.from_standard(alpha[..., 0], alpha[..., 1])

    def sufficient_stats(self, x: Array) -> Params:
        return (jnp.log(x), jnp.log1p(-x))

    def log_base_measure(self, x: Array) -> Array:
        return jnp.zeros(jnp.shape(x))

    def _fisher_entries(self, eta: Params) -> tuple[Array, Array, Array]:
        a, b = self.standard(eta)
        t_ab = trigamma(a + b)
        return trigamma(a) - t_ab, -t_ab, trigamma(b) - t_ab

    def fisher(self, eta: Params) -> Array:
        return sym_2x2(*self._fisher_entries(eta))

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """Analytic 2x2 inverse of ``F + damping I``."""
        return solve_sym_2x2(*self._fisher_entries(eta), v, damping)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        a, b = self.standard(eta)
        shape = tuple(sample_shape) + self.batch_shape(eta)
        return jax.random.beta(key, a, b, shape, dtype=jnp.result_type(a))

    def to_numpyro(self, eta: Params) -> dist.Beta:
        return dist.Beta(*self.standard(eta))

    def marginal_icdf(self, eta: Params, q: Array) -> Array:
        return beta_icdf(q, *self.standard(eta))


@dataclasses.dataclass(frozen=True)
class Dirichlet(ExpFamily):
    """Dirichlet(``alpha``) on the ``dim``-simplex.

    ``T(x) = log x``, ``eta = alpha - 1``, ``h = 1``,
    ``A = sum log Gamma(alpha_k) - log Gamma(alpha_0)``,
    ``m = psi(alpha) - psi(alpha_0)``, ``F = diag(psi'(alpha)) - psi'(alpha_0) 1 1^T``
    (diag-plus-rank-one; inverted by Sherman-Morrison).
    """

    dim: int

    param_shapes = property(lambda self: ((self.dim,),))
    event_shape = property(lambda self: (self.dim,))
    support = constraints.simplex
    reparameterized = True  # implicit reparameterisation via Gamma draws

    @classmethod
    def from_standard(cls, concentration: Array) -> Params:
        return (jnp.asarray(concentration) - 1.0,)

    def standard(self, eta: Params) -> tuple[Array]:
        """``(concentration,)``."""
        return (eta[0] + 1.0,)

    def init(self, batch_shape: tuple[int, ...] = (), concentration: float = 1.0) -> Params:
        return (jnp.full(batch_shape + (self.dim,), concentration - 1.0),)

    def log_partition(self, eta: Params) -> Array:
        alpha = eta[0] + 1.0
        return jnp.sum(gammaln(alpha), -1) - gammaln(jnp.sum(alpha, -1))

    def natural_to_mean(self, eta: Params) -> Params:
        alpha = eta[0] + 1.0
        return (digamma(alpha) - digamma(jnp.sum(alpha, -1, keepdims=True)),)

    def mean_to_natural(self, m: Params) -> Params:
        """Newton solve ``psi(alpha) - psi(alpha_0) = m`` (Minka 2000)."""
        return (dirichlet_from_mean_log(m[0]) - 1.0,)

    def sufficient_stats(self, x: Array) -> Params:
        return (jnp.log(x),)

    def log_base_measure(self, x: Array) -> Array:
        return jnp.zeros(jnp.shape(x)[:-1])

    def fisher(self, eta: Params) -> Array:
        alpha = eta[0] + 1.0
        diag = trigamma(alpha)
        off = trigamma(jnp.sum(alpha, -1))[..., None, None]
        return jnp.eye(self.dim, dtype=diag.dtype) * diag[..., None, :] - off

    def fisher_inverse(self, eta: Params, v: Params, damping: Array | float = 0.0) -> Params:
        """Sherman-Morrison on ``diag(psi'(alpha)) + damping I - psi'(alpha_0) 1 1^T``."""
        return (dirichlet_fisher_solve(eta[0] + 1.0, v[0], damping),)

    def sample(self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()) -> Array:
        alpha = eta[0] + 1.0
        shape = tuple(sample_shape) + self.batch_shape(eta)
        return jax.random.dirichlet(key, alpha, shape, dtype=jnp.result_type(alpha))

    def to_numpyro(self, eta: Params) -> dist.Dirichlet:
        return dist.Dirichlet(eta[0] + 1.0)

    def marginal_icdf(self, eta: Params, q: Array) -> Array:
        """Coordinate ``k`` of a Dirichlet is Beta(alpha_k, alpha_0 - alpha_k)."""
        alpha = eta[0] + 1.0
        return beta_icdf(q, alpha, jnp.sum(alpha, -1, keepdims=True) - alpha)
